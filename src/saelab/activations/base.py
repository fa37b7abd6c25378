"""The activation-source contract: an iterator of `Batch`es that can save and restore its position.

Toy worlds, model hooks and disk caches all speak it, so every SAE trains on every source.
`state_dict()` returns tensors only (it goes into a safetensors checkpoint) and
`load_state_dict()` puts the source back exactly where it was, so training resumes exactly.
Optionally `shard(rank, world_size)` returns one data-parallel rank's share of every batch
(see saelab.train.distributed; without it each rank takes its block of rows of each batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from saelab.errors import ConfigError


@dataclass
class Batch:
    x: torch.Tensor  # [B, d_in] activations
    features: torch.Tensor | None = None  # [B, n_features] true feature activations (toy worlds)
    tokens: torch.Tensor | None = None  # [B] token ids (model sources)
    target: torch.Tensor | None = None  # [B, d_out] downstream target (transcoders)


@runtime_checkable
class ActivationSource(Protocol):
    d_in: int

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class IteratorSource:
    """Wrap any iterable of `[B, d_in]` tensors (or Batches) that saelab did not generate.

    Its position is the number of batches drawn. Resuming re-creates the iterator through
    `factory` and skips that many batches, which restores the exact position whenever the
    iterable is deterministic (a DataLoader with a seeded generator, a list, a file reader).
    """

    def __init__(self, factory: Iterable | Any, d_in: int | None = None):
        self._factory = factory
        self._iterator = iter(factory() if callable(factory) else factory)
        self.position = 0
        self.d_in = d_in if d_in is not None else -1

    def __iter__(self) -> IteratorSource:
        return self

    def __next__(self) -> Batch:
        item = next(self._iterator)
        batch = item if isinstance(item, Batch) else Batch(x=torch.as_tensor(item))
        if batch.x.dim() != 2:
            raise ConfigError(
                f"batch {self.position} has shape {tuple(batch.x.shape)}; sources must yield [B, d_in] "
                "tensors (flatten sequence dimensions with x.reshape(-1, d_in))"
            )
        if self.d_in < 0:
            self.d_in = batch.x.shape[1]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"position": torch.tensor(self.position, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        target = int(state["position"])
        self._iterator = iter(self._factory() if callable(self._factory) else self._factory)
        self.position = 0
        for _ in range(target):
            try:
                next(self)
            except StopIteration:
                raise ConfigError(
                    f"cannot resume: the source ended after {self.position} batches but the checkpoint "
                    f"was at batch {target}; resume with the same data"
                ) from None


def as_source(data: Any, d_in: int | None = None) -> ActivationSource:
    """Accept a source, an iterable of tensors/Batches, or a callable returning one."""
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, torch.Tensor):
        raise ConfigError("pass an iterable of [B, d_in] batches, not one tensor; e.g. data.split(batch_size)")
    return IteratorSource(data, d_in)
