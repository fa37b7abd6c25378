"""The reader registry: one `Format` per on-disk layout, `detect(path)` to tell them apart.

A format module builds a `Format` (a name, a cheap `detect` that looks only at file names and the
small config files, a `read` that returns a saelab SAE, optionally a `write`) and registers it.
Readers translate the file's own convention (orientation, which bias is subtracted, input scaling,
threshold units) into saelab's SAELens-convention weights once, at load time, and record what they
did in `sae.provenance`: the source format and path, the hookpoint(s) in the file's own naming, and
every scaling folded into the weights. `saelab.save` writes that record into cfg.json's metadata.

A new kind of dictionary (a transcoder) is one more `Format` whose `read` returns that class; the
registry, detection and `saelab convert` do not change.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saelab.errors import ConfigError, FileFormatError
from saelab.io.saelens_transcoders import PLACEHOLDER_IN, PLACEHOLDER_OUT
from saelab.sae.base import SAE
from saelab.sae.registry import get_class, make_config


@dataclass(frozen=True)
class Format:
    name: str
    reads: str  # one line: the files and variants this format covers (CLI help, README table)
    detect: Callable[[Path], bool]
    read: Callable[[Path], SAE]
    write: Callable[[SAE, Path], Path] | None = None
    reads_file: bool = False  # `read` gets a file path as given (one file of a folder picks what to load)


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
        raise TypeError(f"format '{fmt.name}' is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def list_formats() -> list[str]:
    return list(_FORMATS)


def get_format(name: str) -> Format:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format '{name}'; known formats: {', '.join(_FORMATS)}") from None


def _folder(path: Path) -> Path:
    """Formats are folders; a path to one of their files means its folder."""
    return path.parent if path.is_file() else path


def detect(path: str | Path) -> Format:
    """The one format whose files are at `path`; a clear error when none or several match."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path} does not exist: it is not a folder (or file) of a saved SAE")
    folder = _folder(path)
    matches = [f for f in _FORMATS.values() if f.detect(folder)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        present = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
        known = "; ".join(f"{f.name}: {f.reads}" for f in _FORMATS.values())
        raise FileFormatError(
            f"{folder} is in no known SAE format (it holds {present or 'no files'}); known formats - {known}"
        )
    raise FileFormatError(
        f"{folder} matches several formats ({', '.join(f.name for f in matches)}); name one with --from / format="
    )


def read(path: str | Path, format: str | None = None) -> SAE:
    """Read the SAE at `path` in `format` (detected when None)."""
    path = Path(path)
    fmt = get_format(format) if format else detect(path)
    if not path.exists():
        raise FileFormatError(f"{path} does not exist; give the folder (or a file) of a saved {fmt.name} SAE")
    return fmt.read(path if fmt.reads_file and path.is_file() else _folder(path))


# ---------------------------------------------------------------------------- helpers for readers


def require_file(folder: Path, name: str, what: str) -> Path:
    p = folder / name
    if not p.is_file():
        raise FileFormatError(f"{p} is missing; a {what} folder needs it")
    return p


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path} cannot be read ({exc}); the file may be truncated") from None


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """Arrays of an .npz, never unpickling (object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FileFormatError(f"{path} cannot be read ({exc}); the file may be truncated") from None


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A torch state dict through torch's restricted loader (tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, unpickling refused, ...
        raise FileFormatError(
            f"{path} cannot be read as a tensor state dict ({type(exc).__name__}: {exc}); "
            "the file may be truncated or hold objects other than tensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileFormatError(f"{path} must hold a dict of tensors (a state dict)")
    return state


def require_keys(tensors: dict[str, torch.Tensor], keys: list[str], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise FileFormatError(f"{path} lacks {missing} for a {what} (it holds {sorted(tensors)})")


def check_shape(t: torch.Tensor, shape: tuple[int, ...], key: str, path: Path, why: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise FileFormatError(f"{path}: '{key}' has shape {tuple(t.shape)} but {why} implies {tuple(shape)}")


def check_thresholds(t: torch.Tensor, key: str, path: Path) -> None:
    """JumpReLU thresholds must be finite and non-negative: saelab stores their logarithm, and a
    negative threshold (which would let negative pre-activations through) has no saelab form."""
    if not torch.isfinite(t).all() or bool((t < 0).any()):
        raise FileFormatError(
            f"{path}: '{key}' holds negative or non-finite JumpReLU thresholds (min {t.min().item():.4g}); "
            "saelab reads thresholds >= 0 only"
        )


def transcoder_sites(hook_in: Any, hook_out: Any, path: Path) -> tuple[str, str, str | None]:
    """(site, write_site, note) of a transcoder from the hooks its file names: placeholders
    'input' -> 'output' (and a note saying so) for hooks it does not name."""
    for name, hook in (("input", hook_in), ("output", hook_out)):
        if hook is not None and (not isinstance(hook, str) or not hook.strip()):
            raise FileFormatError(f"{path}: the {name} hook must be a non-empty string (got {hook!r:.60})")
    if hook_in and hook_in == hook_out:
        raise FileFormatError(f"{path}: a transcoder reads and writes the same hook {hook_in!r}; fix the output hook")
    missing = [n for n, h in (("input", hook_in), ("output", hook_out)) if not h]
    note = f"{path.name} names no {' or '.join(missing)} hook; the sites are placeholders" if missing else None
    return hook_in or PLACEHOLDER_IN, hook_out or PLACEHOLDER_OUT, note


def build(values: dict[str, Any], state: dict[str, torch.Tensor], path: Path, provenance: dict[str, Any]) -> SAE:
    """A saelab SAE from config values and SAELens-named float32 tensors, every shape checked."""
    try:
        cfg = make_config(values)
    except ConfigError as exc:
        raise FileFormatError(f"{path}: the file's settings are not a valid saelab SAE ({exc})") from None
    sae = get_class(cfg.architecture)(cfg)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in sae.saved_state().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:  # a reader bug rather than a user's file: name both sides
        raise FileFormatError(
            f"{path}: converted tensors do not fit '{cfg.architecture}': missing {missing}, extra {extra}"
        )
    for key, shape in expected.items():
        check_shape(state[key], shape, key, path, f"d_in={cfg.d_in}, d_sae={cfg.d_sae}")
    sae.load_saved_state(state)
    sae.provenance = {"source_format": provenance["source_format"], "source_path": str(path), **provenance}
    return sae.eval()
