"""Atomic writes: a file is either the old version or the complete new one, never half.

Every writer goes through `atomic_path`: write to a temp file in the same folder, fsync,
then `os.replace` (atomic on POSIX and Windows within one filesystem). A write that fails (disk
full, read-only folder) raises `WriteError` naming the file and leaves the old version in place.
Files get the permissions the umask allows (as `open` would), not a temp file's private 0600:
run folders are often shared. `read_json` is the reading side: a damaged file is named, with
what to do about it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from saelab.errors import FileFormatError, WriteError

TEMP_SUFFIX = ".tmp"  # `.NAME.<random>.tmp`: what a killed writer leaves behind (see `remove_stale_temp`)


def umask() -> int:
    """The process umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create folder `path` (and its parents); a path that is a file, sits under a file or cannot
    be created raises WriteError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(f"{what} {path} exists and is not a folder; choose another path") from None
    except NotADirectoryError:
        raise WriteError(f"{what} {path} lies under a file, not a folder; choose another path") from None
    except OSError as exc:
        raise WriteError(f"cannot create {what} {path} ({exc.strerror or exc}); choose another path") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success move it over `path`, on error remove it. An
    OSError (or safetensors' wrapped I/O error) on the way becomes WriteError naming `path`."""
    path = Path(path)
    ensure_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 whatever the umask
                os.fchmod(fd, 0o666 & ~umask())
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except (OSError, SafetensorError) as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        raise _write_error(path, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: BaseException) -> WriteError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return WriteError(
        f"cannot write {path} ({reason}); the previous version, if any, is kept: free disk space or "
        "fix the folder's permissions, then run again"
    )


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a log record); a failed write raises WriteError and cuts nothing but this line."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise _write_error(Path(path), exc) from None


def remove_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed writer left in `folder` (only call this while holding the
    folder's run lock, so no live writer owns them); returns what was removed."""
    removed = []
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """The JSON in `path`; an unreadable or malformed file raises FileFormatError naming the
    file, the cause and `remedy` (what the user should do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise FileFormatError(f"{path} cannot be read ({exc}); {remedy}") from None
    except ValueError as exc:  # malformed JSON or not UTF-8
        raise FileFormatError(f"{path} is not valid JSON ({exc}); {remedy}") from None


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """Save a matplotlib figure atomically (format from the target's suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
