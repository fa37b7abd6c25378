"""Checkpoints that resume exactly: weights, Adam state, latent statistics, source position and
every RNG state, in safetensors plus JSON (never pickle). Each checkpoint is a folder written
under a temporary name and renamed into place, so a kill mid-write leaves the previous one intact.

Layout: OUT/checkpoints/step_000100/{state.json, tensors.safetensors}; OUT/checkpoints/latest
names the newest complete one. A data-parallel run (saelab.train.distributed) stores what
differs between ranks, the source position and RNG states, once per rank: rank 0's under
`source.*` / `rng.*` (as in a single-process run), rank r's under `rank{r}.source.*` /
`rank{r}.rng.*`, with `world_size` in state.json.

state.json records a SHA-256 of the tensors file and of its own content (`checksums`), so a
truncated, bit-flipped or hand-edited checkpoint is found (`verify`) before anything is loaded,
and the trainer resumes from the previous intact one instead. A checkpoint found damaged is
renamed `damaged_step_*` (kept for inspection, never read again); temp folders a killed writer
left are removed when the next run starts (`remove_stale`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from saelab.errors import FileFormatError, SaelabError, WriteError
from saelab.io.atomic import (
    _json_default,
    read_json,
    remove_stale_temp,
    umask,
    write_json,
    write_safetensors,
    write_text,
)

_STATE = "state.json"
_TENSORS = "tensors.safetensors"
DAMAGED_PREFIX = "damaged_"


def _checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def step_path(out_dir: str | Path, step: int) -> Path:
    return _checkpoint_root(Path(out_dir)) / step_name(step)


def _complete(path: Path) -> bool:
    return (path / _STATE).exists() and (path / _TENSORS).exists()


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step."""
    root = _checkpoint_root(Path(out_dir))
    pointer = root / "latest"
    try:
        name = pointer.read_text(encoding="utf-8").strip() if pointer.exists() else ""
    except (OSError, ValueError):  # a damaged pointer: fall back to the folders themselves
        name = ""
    if re.fullmatch(r"step_\d{9}", name) and _complete(root / name):
        return root / name
    complete = sorted(p for p in root.glob("step_*") if _complete(p))
    return complete[-1] if complete else None


def complete_steps(out_dir: str | Path) -> list[int]:
    """The steps of every complete checkpoint in `out_dir`, oldest first."""
    root = _checkpoint_root(Path(out_dir))
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit() and _complete(p))


def step_folders(out_dir: str | Path) -> dict[int, Path]:
    """Every checkpoint folder in `out_dir` by step, complete or not."""
    root = _checkpoint_root(Path(out_dir))
    return {int(p.name[5:]): p for p in sorted(root.glob("step_*")) if p.is_dir() and p.name[5:].isdigit()}


def _flatten(prefix: str, tensors: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        into[f"{prefix}.{k}"] = v.detach().cpu().contiguous()


def _unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global RNG (torch CPU and CUDA, NumPy, Python) as tensors plus JSON-able values."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value)
    return tensors, sd["param_groups"]


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # Give each moment buffer its parameter's memory layout: vectorised and strided kernels
    # round differently, and an exact resume needs bit-identical updates.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p).copy_(value)


def _rank_prefix(rank: int) -> str:
    return "" if rank == 0 else f"rank{rank}."


def local_state(source) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's source position and RNG states: the part of a checkpoint that differs
    between data-parallel ranks (tensors, plus the JSON half of the RNG states)."""
    tensors: dict[str, torch.Tensor] = {}
    _flatten("source", source.state_dict(), tensors)
    rng_tensors, rng_meta = rng_state()
    _flatten("rng", rng_tensors, tensors)
    return tensors, rng_meta


def save(
    out_dir: str | Path,
    step: int,
    state: dict[str, Any],
    sae,
    optimizer,
    stats,
    ranks: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
) -> Path:
    """Write checkpoint `step` and point `latest` at it (pruning is the caller's: `prune`).

    `ranks`: every rank's `local_state` (source position and RNG states), rank 0 first."""
    root = _checkpoint_root(Path(out_dir))
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    tensors: dict[str, torch.Tensor] = {}
    _flatten("sae", sae.state_dict(), tensors)
    opt_tensors, groups = _optimizer_state(optimizer)
    _flatten("optimizer", opt_tensors, tensors)
    _flatten("stats", stats.state_dict(), tensors)
    meta: dict[str, Any] = {"world_size": len(ranks)}
    for rank, (rank_tensors, rng_meta) in enumerate(ranks):
        tensors.update({_rank_prefix(rank) + k: v for k, v in rank_tensors.items()})
        meta[_rank_prefix(rank) + "rng"] = rng_meta
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700 whatever the umask
    except OSError as exc:
        raise WriteError(f"cannot write checkpoint {root / name} ({exc.strerror or exc}); check the folder") from None
    try:
        write_safetensors(tmp / _TENSORS, tensors)
        full = {**state, "optimizer_param_groups": groups, **meta}
        full["checksums"] = {_TENSORS: _file_sha256(tmp / _TENSORS), _STATE: _state_sha256(full)}
        write_json(tmp / _STATE, full)
        final = root / name
        old = None
        if final.exists():  # rewriting the same step: keep the old copy until the new one is in place
            old = root / f".old_{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:  # WriteError from a file, or the folder's own rename
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if exc.strerror else str(exc).split(" (", 1)[-1].split(")", 1)[0]
        raise WriteError(
            f"cannot write checkpoint {root / name} ({reason}); the previous checkpoints are kept: free disk "
            "space, then run the same command again to resume"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(root / "latest", name + "\n")
    return final


def prune(out_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (the one `latest` names always stays)."""
    root = _checkpoint_root(Path(out_dir))
    newest = latest(out_dir)
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != newest)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON half of a checkpoint (configs, step, tokens), read before any tensor is touched;
    a damaged one raises FileFormatError naming what is wrong."""
    remedy = f"delete {path} to resume from the previous checkpoint"
    state = read_json(Path(path) / _STATE, remedy)
    problem = _state_problem(state)
    if problem:
        raise FileFormatError(f"checkpoint {path} is damaged ({_STATE}: {problem}); {remedy}")
    return state


def verify(path: str | Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (a file missing, truncated, altered),
    or None when it is intact. Reads every byte once; loads nothing."""
    path = Path(path)
    for name in (_STATE, _TENSORS):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((path / _STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{_STATE} is unreadable ({exc})"
    problem = _state_problem(state)
    if problem:
        return f"{_STATE}: {problem}"
    sums = state.get("checksums")
    if sums is not None:  # written by this version: both files are covered
        if not isinstance(sums, dict) or sums.get(_STATE) != _state_sha256(state):
            return f"{_STATE} was altered (its checksum does not match)"
        if sums.get(_TENSORS) != _file_sha256(path / _TENSORS):
            return f"{_TENSORS} is truncated or altered (its checksum does not match)"
        return None
    try:  # an older checkpoint: at least the tensors file must be whole
        with safe_open(str(path / _TENSORS), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        return f"{_TENSORS} is unreadable ({exc})"
    return None


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint folder out of the way (`damaged_step_*`), so it is never read
    again but stays for inspection; returns the new path."""
    path = Path(path)
    target = path.with_name(DAMAGED_PREFIX + path.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def remove_stale(out_dir: str | Path) -> None:
    """Clean what a killed checkpoint write left: its temp folder (`.step_*`), or a checkpoint
    moved aside for a rewrite of the same step (`.old_step_*`): put back when the rewrite never
    landed, else deleted. Call only while holding the run lock."""
    root = _checkpoint_root(Path(out_dir))
    if not root.is_dir():
        return
    for p in root.glob(".old_step_*"):
        final = root / p.name[len(".old_") :]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)
    for p in root.glob(".step_*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    remove_stale_temp(root)


def load(path: str | Path, sae, optimizer, stats, source, rank: int = 0) -> dict[str, Any]:
    """Restore everything; `rank` picks which rank's source position and RNG states to take."""
    path = Path(path)
    state = read_state(path)
    state.pop("checksums", None)
    remedy = f"delete {path} to resume from the previous checkpoint"
    try:
        tensors = load_file(str(path / _TENSORS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"checkpoint {path} is missing or truncated ({exc}); {remedy}") from None
    try:
        sae.load_state_dict(_unflatten("sae", tensors))
    except RuntimeError as exc:
        raise FileFormatError(f"checkpoint {path} does not fit this SAE: {exc}") from None
    prefix = _rank_prefix(rank)
    rng_meta = {k: state.pop(k) for k in [k for k in state if k.endswith("rng")]}
    if prefix + "rng" not in rng_meta:
        raise FileFormatError(f"checkpoint {path} holds no source/RNG state for rank {rank}")
    try:
        _load_optimizer_state(optimizer, _unflatten("optimizer", tensors), state.pop("optimizer_param_groups"))
        stats.load_state_dict(_unflatten("stats", tensors))
        source.load_state_dict(_unflatten(prefix + "source", tensors))
        set_rng_state(_unflatten(prefix + "rng", tensors), rng_meta[prefix + "rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, SaelabError):
            raise
        raise FileFormatError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); {remedy}") from None
    return state


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _state_sha256(state: dict[str, Any]) -> str:
    """The checksum of state.json's content (all but `checksums`), independent of formatting."""
    content = {k: v for k, v in state.items() if k != "checksums"}
    canonical = json.dumps(json.loads(json.dumps(content, default=_json_default)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _state_problem(state: Any) -> str | None:
    """What makes a parsed state.json unusable (a field missing or of the wrong type), or None."""
    if not isinstance(state, dict):
        return "not a JSON object"
    for key, kinds in (
        ("step", int),
        ("tokens", int),
        ("input_scale", (int, float)),
        ("sae_config", dict),
        ("train_config", dict),
        ("optimizer_param_groups", list),
        ("rng", dict),
    ):
        value = state.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"'{key}' is missing or not a {getattr(kinds, '__name__', 'number')} (got {value!r:.40})"
    if state["step"] < 0 or state["tokens"] < 0:
        return "'step' and 'tokens' must be >= 0"
    if not (math.isfinite(state["input_scale"]) and state["input_scale"] > 0):
        return f"'input_scale' must be a positive number (got {state['input_scale']!r})"
    return None
