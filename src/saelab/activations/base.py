"""The activation-source contract: an iterator of `Batch`es that can save and restore its position.

Toy worlds, model hooks and disk caches all speak it, so every SAE trains on every source.

A batch says what a dictionary reads and what it must reproduce: `x` is the encoder's input and
`target` the decoder's goal. For an SAE they are one tensor (`target is x`, no copy); a source
that pairs two places (an MLP's input and output, for transcoders) gives a distinct `target`.
Losses, FVU, MSE and explained variance are measured against the target. A source may also yield
several named `sites` per batch (several hookpoints, or one hookpoint in several models, keyed by
module path or `alias/path`); `Batch.view(read, write)` is the batch a dictionary that reads one
site and writes another sees, `view(site)` the batch of an SAE on that site, and `view([a, b])`
the concatenation a crosscoder reads and writes.
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
    x: torch.Tensor  # [B, d_in] what the encoder reads
    features: torch.Tensor | None = None  # [B, n_features] true feature activations (toy worlds)
    tokens: torch.Tensor | None = None  # [B] token ids (model sources)
    target: torch.Tensor | None = None  # [B, d_out] what the decoder must reproduce (None: x itself)
    sites: dict[str, torch.Tensor] | None = None  # every named site of this batch, [B, d_site] each
    # What an objective beyond reconstruction needs from the rows behind x (end-to-end training:
    # token ids, masks and clean next-token distributions; see saelab.train.e2e). Carried by `view`.
    context: Any = None

    def __post_init__(self):
        if self.target is None:
            self.target = self.x

    def view(self, read: str | list[str] | None = None, write: str | list[str] | None = None) -> Batch:
        """The batch of a dictionary that reads site `read` and writes site `write` (default: the
        site it reads, as an SAE does); `None` for `read` means this batch's own `x`. A list of
        sites is their concatenation along the last dimension, in that order."""
        x = self.x if read is None else self._sites(read)
        target = x if write is None or write == read else self._sites(write)
        return Batch(
            x=x, features=self.features, tokens=self.tokens, target=target, sites=self.sites, context=self.context
        )

    def _sites(self, names: str | list[str]) -> torch.Tensor:
        if isinstance(names, str):
            return self._site(names)
        if len(names) == 1:
            return self._site(names[0])
        return torch.cat([self._site(n) for n in names], dim=-1)

    def rows(self, index: slice | torch.Tensor) -> Batch:
        """The same batch restricted to some rows (a data-parallel rank's share); `target is x` stays so."""
        x = self.x[index]

        def pick(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v[index]

        sites = None if self.sites is None else {k: v[index] for k, v in self.sites.items()}
        target = x if self.target is self.x else self.target[index]
        return Batch(x=x, features=pick(self.features), tokens=pick(self.tokens), target=target, sites=sites)

    def _site(self, name: str) -> torch.Tensor:
        if not self.sites or name not in self.sites:
            have = ", ".join(sorted(self.sites or {})) or "none (a single-site source)"
            raise ConfigError(f"the batch has no site '{name}'; its sites: {have}")
        return self.sites[name]


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
    The trainer rewinds its source once before step 0 (it reads the first batches to estimate
    the input scale, then trains on them), so `factory` must be re-iterable (a list, a
    DataLoader) or a function returning a new iterator; a one-shot iterator (a generator,
    `iter(list)`) is refused, since it would silently lose those batches.
    """

    def __init__(self, factory: Iterable | Any, d_in: int | None = None):
        if isinstance(factory, Iterator):
            raise ConfigError(
                f"a one-shot iterator ({type(factory).__name__}) cannot be rewound, and training reads the first "
                "batches twice (input-scale estimate, then training) and resumes by replaying; pass a list, or a "
                "function returning a new iterator (e.g. `lambda: my_batches()`)"
            )
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
        if target < 0:
            raise ConfigError(f"cannot resume: the saved source position {target} is negative")
        iterator = iter(self._factory() if callable(self._factory) else self._factory)
        if iterator is self._iterator and self.position > 0:
            raise ConfigError(
                "cannot rewind the data: the function passed as data returned the same iterator again; "
                "make it create a new one on each call (e.g. `lambda: my_batches()`)"
            )
        self._iterator = iterator
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


class TensorSource:
    """Batches of rows of one [N, d] tensor, reshuffled on each pass with `seed` (or in order);
    its position (pass and row) and generator state make resuming exact."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True, repeat: bool = True):
        if data.dim() != 2 or data.shape[0] < batch_size:
            raise ConfigError(
                f"a tensor source needs a [N, d] tensor with N >= batch_size={batch_size} (got {tuple(data.shape)})"
            )
        self.data, self.batch_size, self.shuffle, self.repeat = data, batch_size, shuffle, repeat
        self.gen = torch.Generator().manual_seed(seed)
        self.position = 0
        self._order, self._row = self._new_order(), 0

    @classmethod
    def from_file(cls, path: str, key: str | None, batch_size: int, seed: int, shuffle: bool, repeat: bool):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from saelab.errors import FileFormatError

        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as exc:
            raise FileFormatError(f"cannot read {path} as safetensors ({exc})") from None
        if key is None and len(tensors) != 1:
            raise ConfigError(f"{path} holds tensors {sorted(tensors)}; name one with `key`")
        if key is not None and key not in tensors:
            raise ConfigError(f"{path} has no tensor '{key}'; it holds {sorted(tensors)}")
        return cls(tensors[key or next(iter(tensors))].float(), batch_size, seed, shuffle, repeat)

    @property
    def d_in(self) -> int:
        return self.data.shape[1]

    def _new_order(self) -> torch.Tensor:
        n = self.data.shape[0]
        return torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)

    def __iter__(self) -> TensorSource:
        return self

    def __next__(self) -> Batch:
        if self._row + self.batch_size > len(self._order):
            if not self.repeat:
                raise StopIteration
            self._order, self._row = self._new_order(), 0
        rows = self._order[self._row : self._row + self.batch_size]
        self._row += self.batch_size
        self.position += 1
        return Batch(x=self.data[rows])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "generator": self.gen.get_state(),
            "order": self._order.clone(),
            "row": torch.tensor(self._row, dtype=torch.int64),
            "position": torch.tensor(self.position, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(state["generator"])
        self._order, self._row = state["order"].clone(), int(state["row"])
        self.position = int(state["position"])
