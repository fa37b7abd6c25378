"""Data-parallel training over `torch.distributed`: the trainer's one view of "other ranks".

Launch with `torchrun --nproc_per_node N -m saelab.cli train CONFIG --out DIR` (gloo on CPU,
NCCL on CUDA), or initialise a process group yourself before building a `Trainer` (on CUDA,
`torch.cuda.set_device(local_rank)` first). With one process every method here is a no-op, so
the single-process trainer is unchanged.

What each rank does, and why:

- **Data.** Each rank trains on its own share of every global batch, so the global batch of
  the run is what the source's `batch_size` says, whatever the number of ranks. A source that
  can produce its share cheaply defines `shard(rank, world_size)` (toy worlds: an independent
  stream of `batch_size / world_size` rows per rank, seeded from the source's seed and the
  rank). Any other source is drawn in full on every rank and each rank keeps its contiguous
  block of rows (`RowShard`): exactly the single-process batches, but every rank pays for
  producing the whole batch, so harvest expensive model activations to a disk cache first.
- **Gradients.** `DistributedDataParallel` wraps a thin module whose forward is the SAE's
  `loss_terms`; it averages gradients over ranks during backward. For losses that are a mean
  over samples (relu, topk, jumprelu, gated, ...) the average of the ranks' gradients on
  B/N rows each is the gradient on the combined B rows, so the update matches single-process
  training on the combined batch up to float rounding. Batch-global losses are not exactly
  equivalent: BatchTopK keeps the top (B/N)*k activations of each rank's rows rather than the
  top B*k of the combined batch, and its inference threshold follows rank 0's batches (DDP
  broadcasts rank 0's buffers each step, which keeps every rank's copy identical).
- **Initialisation.** The estimation batches are gathered from every rank (in the order of
  the combined batches) and the input scale, b_dec and `init_from_data` are computed on that
  sample; rank 0's result is then broadcast, so every rank starts from the same weights.
- **Statistics.** Fired counts and token counts are summed over ranks each step, so dead and
  dense latents (and the AuxK dead mask) are those of the combined batch on every rank.
- **Checkpoints.** Rank 0 writes the shared state (weights, Adam, statistics) and every
  rank's source position and RNG states, gathered into the same checkpoint folder, which must
  be on a filesystem every rank can read. A checkpoint resumes exactly under the same number
  of ranks; under another number the trainer refuses with both numbers named.
- **Failures.** The process group has a finite timeout, so a rank stuck waiting on a dead or
  wedged peer raises instead of hanging; torchrun then stops the job and reports the failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from saelab.activations.base import ActivationSource, Batch
from saelab.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Returns True when this call created it (the caller
    then `shutdown()`s it), False for a plain launch or a group that is already running.

    The backend follows the device: NCCL for CUDA, gloo otherwise. `timeout_s` bounds how long
    a collective waits for a missing rank before raising.
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group, if there is one (the end of a `saelab train` run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 or without a process group: the process that logs and writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RowShard:
    """Rank `rank`'s contiguous block of rows of every batch from a source that cannot shard
    itself. The wrapped source is drawn in full on every rank, so its position (and hence the
    checkpointed state) is the same everywhere and the combined batch is the source's batch."""

    def __init__(self, source: ActivationSource, rank: int, world_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size

    @property
    def d_in(self) -> int:
        return self.source.d_in

    @property
    def position(self) -> int:
        return getattr(self.source, "position", -1)

    def __iter__(self) -> RowShard:
        return self

    def __next__(self) -> Batch:
        batch = next(self.source)
        n = batch.x.shape[0]
        if n % self.world_size:
            raise ConfigError(
                f"a batch of {n} rows cannot be split evenly over {self.world_size} ranks; "
                f"use a batch size divisible by {self.world_size} (and drop a short last batch)"
            )
        rows = slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)
        return batch.rows(rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.source.load_state_dict(state)


class _LossModule(torch.nn.Module):
    """The SAE's training forward as a module's forward, which is what DDP wraps and hooks."""

    def __init__(self, sae: torch.nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, ctx: Any):
        return self.sae.train_forward(x, ctx)


class DataParallel:
    """The ranks of the current process group (or one rank when there is none)."""

    def __init__(self):
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if active else 0
        self.world_size = dist.get_world_size() if active else 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def shard(self, source: ActivationSource) -> ActivationSource:
        """This rank's share of the data: the source's own `shard` if it has one, else `RowShard`."""
        if not self.active:
            return source
        if callable(getattr(source, "shard", None)):
            return source.shard(self.rank, self.world_size)
        return RowShard(source, self.rank, self.world_size)

    def all_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of one batch, concatenated in rank order: the combined batch."""
        if not self.active:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def sync_from_main(self, module: torch.nn.Module, value: float) -> float:
        """Give every rank rank 0's parameters and buffers, and return rank 0's `value`."""
        if not self.active:
            return value
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)
        box = [value]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place); used for the latent statistics' counts."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def from_main(self, obj: Any) -> Any:
        """Rank 0's value of a small picklable object (e.g. which checkpoint to resume)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (rank order), None elsewhere; [obj] with one rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------ gradients
    def loss_fn(self, sae: torch.nn.Module) -> Callable:
        """`sae.train_forward`, through DDP when there are several ranks and weights to train.

        DDP averages gradients over ranks inside backward. It also checks at construction that
        every rank holds the same parameters and broadcasts rank 0's buffers before each forward.
        """
        if not self.active:
            return sae.train_forward
        device = next(sae.parameters()).device
        ids = [device] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(_LossModule(sae), device_ids=ids)
