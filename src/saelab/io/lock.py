"""One writer per run folder: an advisory lock on OUT/.lock for the whole run.

Two runs writing one folder would mix their checkpoints, logs and results, so the second is
refused with the holder named (its pid, host and start time, which the holder writes into the
lock file). The lock is `flock` on an open file: the OS drops it when the holding process exits
or is killed, so a killed run never leaves the folder stuck, and the file itself may stay.
Within one process the lock is re-entrant (`run` holds it and the `Trainer` inside takes it
again). Where `fcntl` does not exist (Windows) there is no lock. On network filesystems `flock`
is only as reliable as the filesystem makes it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from saelab.errors import FolderInUseError
from saelab.io.atomic import ensure_folder, umask

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"

_held: dict[Path, list] = {}  # resolved folder -> [open file, depth] for the locks this process holds
_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the run lock of `folder` (created if needed) until the block ends; FolderInUseError
    names the other process if it holds it."""
    folder = ensure_folder(folder, "run folder")
    key = folder.resolve()
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(folder), 1]
    try:
        yield folder
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                entry[0].close()  # closing the file releases the flock


def holds_lock(folder: str | os.PathLike) -> bool:
    """Whether this process holds `folder`'s run lock."""
    return Path(folder).resolve() in _held


def _acquire(folder: Path):
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    except OSError as exc:
        from saelab.errors import WriteError

        raise WriteError(f"cannot create the run lock {path} ({exc.strerror or exc}); check the folder") from None
    f = os.fdopen(fd, "r+", encoding="utf-8")
    if fcntl is None:
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return f  # a filesystem without flock (ENOLCK): run unlocked rather than not at all
        holder = f.read().strip() or "another process"
        f.close()
        raise FolderInUseError(
            f"{folder} is in use by another saelab run ({holder}); wait for it to finish, stop it, "
            "or use another --out folder"
        ) from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}")
    f.flush()
    return f
