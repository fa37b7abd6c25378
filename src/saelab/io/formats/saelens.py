"""SAELens v6: `cfg.json` + `sae_weights.safetensors` (saelab's own layout; see saelab.io.saelens)."""

from __future__ import annotations

from pathlib import Path

from saelab.io import saelens
from saelab.io.formats.base import Format, register_format
from saelab.sae.base import SAE


def _detect(folder: Path) -> bool:
    return (folder / saelens.CFG_FILE).is_file() and (folder / saelens.WEIGHTS_FILE).is_file()


def _write(sae: SAE, folder: Path) -> Path:
    return saelens.save(sae, folder)


FORMAT = register_format(
    Format(
        name="saelens",
        reads="cfg.json + sae_weights.safetensors: standard, gated, jumprelu, topk, batchtopk and "
        "matryoshka_batchtopk (training checkpoints), matching_pursuit; transcoder, skip_transcoder, "
        "jumprelu_transcoder, jumprelu_skip_transcoder",
        detect=_detect,
        read=lambda folder: saelens.load(folder),
        write=_write,
    )
)
