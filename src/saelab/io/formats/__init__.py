"""Readers (and writers) for the SAE files other libraries publish, behind one registry.

`read(path)` detects the format and returns a saelab SAE whose encodings equal the original
library's; `sae.provenance` records the source format, hookpoints and any scaling folded in.
Importing this package registers every built-in format (one module each).
"""

from __future__ import annotations

from pathlib import Path

from saelab.errors import ConfigError
from saelab.io import dictionary
from saelab.io import saelens as saelens_layout
from saelab.io.formats import (  # noqa: F401  (each import registers its format)
    circuit_tracer,
    dictionary_learning,
    gemma_scope_1,
    gemma_scope_2,
    llama_scope,
    saelab_dictionary,
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


def save(sae: SAE, path: str | Path, sparsity=None, metadata: dict | None = None) -> Path:
    """Write `sae` to folder `path`: in the SAELens v6 layout when SAELens has a class for it (SAEs, and
    ReLU / JumpReLU / BatchTopK / Matryoshka transcoders with or without a skip connection), else in
    saelab's dictionary layout (crosscoders, TopK transcoders), which `load` reads back.
    `sparsity`: per-latent firing frequency, kept beside the weights in either layout."""
    if fits_saelens(sae):
        out, stale = saelens_layout.save(sae, path, sparsity=sparsity, metadata=metadata), dictionary.FILES
    else:
        out, stale = dictionary.save(sae, path, sparsity=sparsity, metadata=metadata), saelens_layout.FILES
    for name in stale:  # a folder saved over in the other layout would match both formats
        (out / name).unlink(missing_ok=True)
    return out


def read_metadata(path: str | Path) -> dict:
    """The `metadata` saelab wrote beside a saved dictionary (either layout); FileFormatError if none."""
    folder = Path(path)
    if dictionary.detect(folder):
        return dictionary.read_metadata(folder)
    return saelens_layout.read_config(folder).get("metadata") or {}


def fits_saelens(sae: SAE) -> bool:
    """True when the SAELens layout can hold `sae` (one site read, one written, a class SAELens has)."""
    if saelens_layout.reads_several_sites(sae):
        return False
    if not saelens_layout.is_transcoder(sae):
        return True
    try:
        saelens_layout.saelens_transcoders.saelens_architecture(
            sae.saved_architecture(), sae.cfg.skip, sae.architecture
        )
    except ConfigError:
        return False
    return True


__all__ = [
    "Format",
    "detect",
    "fits_saelens",
    "get_format",
    "list_formats",
    "load",
    "read",
    "read_metadata",
    "register_format",
    "save",
]
