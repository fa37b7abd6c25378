"""Readers (and writers) for the SAE files other libraries publish, behind one registry.

`read(path)` detects the format and returns a saelab SAE whose encodings equal the original
library's; `sae.provenance` records the source format, hookpoints and any scaling folded in.
Importing this package registers every built-in format (one module each).
"""

from __future__ import annotations

from pathlib import Path

from saelab.errors import ConfigError
from saelab.io.formats import (  # noqa: F401  (each import registers its format)
    dictionary_learning,
    gemma_scope_1,
    gemma_scope_2,
    llama_scope,
    saelens,
    sparsify,
)
from saelab.io.formats.base import Format, detect, get_format, list_formats, read, register_format
from saelab.sae.base import SAE


def load(path: str | Path, device: str = "cpu", d_in: int | None = None, format: str | None = None) -> SAE:
    """Load the SAE at `path` in any known format (detected unless `format` names one).
    `d_in`, if given, must match the file."""
    sae = read(path, format)
    if d_in is not None and sae.cfg.d_in != d_in:
        raise ConfigError(
            f"{path} holds an SAE with d_in={sae.cfg.d_in} but d_in={d_in} was expected; "
            "load the SAE trained on this hookpoint"
        )
    return sae.to(device)


__all__ = ["Format", "detect", "get_format", "list_formats", "load", "read", "register_format"]
