"""Checkpoints that resume exactly: weights, Adam state, latent statistics, source position and
every RNG state, in safetensors plus JSON (never pickle). Each checkpoint is a folder written
under a temporary name and renamed into place, so a kill mid-write leaves the previous one intact.

Layout: OUT/checkpoints/step_000100/{state.json, tensors.safetensors}; OUT/checkpoints/latest
names the newest complete one. A data-parallel run (saelab.train.distributed) stores what
differs between ranks, the source position and RNG states, once per rank: rank 0's under
`source.*` / `rng.*` (as in a single-process run), rank r's under `rank{r}.source.*` /
`rank{r}.rng.*`, with `world_size` in state.json.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from saelab.errors import FileFormatError
from saelab.io.atomic import read_json, write_json, write_safetensors, write_text

_STATE = "state.json"
_TENSORS = "tensors.safetensors"


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
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if _complete(path):
            return path
    complete = sorted(p for p in root.glob("step_*") if _complete(p))
    return complete[-1] if complete else None


def complete_steps(out_dir: str | Path) -> list[int]:
    """The steps of every complete checkpoint in `out_dir`, oldest first."""
    root = _checkpoint_root(Path(out_dir))
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit() and _complete(p))


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write_safetensors(tmp / _TENSORS, tensors)
        write_json(tmp / _STATE, {**state, "optimizer_param_groups": groups, **meta})
        final = root / name
        old = None
        if final.exists():  # rewriting the same step: keep the old copy until the new one is in place
            old = root / f".old_{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
    """The JSON half of a checkpoint (configs, step, tokens), read before any tensor is touched."""
    return read_json(Path(path) / _STATE, f"checkpoint {path} is damaged: delete it to restart from the previous one")


def load(path: str | Path, sae, optimizer, stats, source, rank: int = 0) -> dict[str, Any]:
    """Restore everything; `rank` picks which rank's source position and RNG states to take."""
    path = Path(path)
    state = read_state(path)
    try:
        tensors = load_file(str(path / _TENSORS))
    except (OSError, ValueError) as exc:
        raise FileFormatError(
            f"checkpoint {path} is missing or truncated ({exc}); delete it to restart from the previous one"
        ) from None
    try:
        sae.load_state_dict(_unflatten("sae", tensors))
    except RuntimeError as exc:
        raise FileFormatError(f"checkpoint {path} does not fit this SAE: {exc}") from None
    _load_optimizer_state(optimizer, _unflatten("optimizer", tensors), state.pop("optimizer_param_groups"))
    stats.load_state_dict(_unflatten("stats", tensors))
    prefix = _rank_prefix(rank)
    rng_meta = {k: state.pop(k) for k in [k for k in state if k.endswith("rng")]}
    if prefix + "rng" not in rng_meta:
        raise FileFormatError(f"checkpoint {path} holds no source/RNG state for rank {rank}")
    source.load_state_dict(_unflatten(prefix + "source", tensors))
    set_rng_state(_unflatten(prefix + "rng", tensors), rng_meta[prefix + "rng"])
    return state
