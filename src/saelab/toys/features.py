"""What every ground-truth world shares: feature directions, the linear embedding and the stream.

A world has N true features, each with a firing probability and a direction in d dimensions. An
activation is x = sum_i a_i * direction_i (+ noise), and every batch carries the true feature
activations a, so metrics can compare an SAE with the truth. The kinds of world live in
`saelab.toys.worlds` (and the toy models of superposition in `saelab.toys.tms`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from typing import Any

import torch

from saelab.activations.base import Batch
from saelab.errors import ConfigError


def embed_directions(n: int, d: int, target_cos_sim: float, seed: int, steps: int = 400) -> torch.Tensor:
    """Unit directions [n, d] whose pairwise cosine similarities are as close to the target as possible.

    With n <= d and target 0 the directions are exactly orthonormal. Otherwise gradient descent
    on the squared deviation of every off-diagonal cosine from the target (for n > d and target 0
    this is the frame potential, whose minimisers are tight frames: the least interference possible).
    The result is a deterministic function of the arguments, computed once per process: a world is
    built again for its held-out source and by every run of a sweep (seconds each at n = 256).
    """
    return _embed_directions(int(n), int(d), float(target_cos_sim), int(seed), int(steps)).clone()


@functools.lru_cache(maxsize=64)
def _embed_directions(n: int, d: int, target_cos_sim: float, seed: int, steps: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if n <= d and target_cos_sim == 0:
        q, _ = torch.linalg.qr(w.t())
        return q.t().float().contiguous()
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.02)
    off = ~torch.eye(n, dtype=torch.bool)
    for _ in range(steps):
        u = w / w.norm(dim=1, keepdim=True)
        cos = u @ u.t()
        loss = (cos[off] - target_cos_sim).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (w / w.norm(dim=1, keepdim=True)).float().contiguous()


def interference(directions: torch.Tensor) -> dict[str, float]:
    """Mean and max |cosine| between distinct unit feature directions."""
    cos = directions @ directions.t()
    off = cos[~torch.eye(len(cos), dtype=torch.bool)].abs()
    if not off.numel():
        return {"mean_abs_cos": 0.0, "max_abs_cos": 0.0}
    return {"mean_abs_cos": float(off.mean()), "max_abs_cos": float(off.max())}


class LinearWorld:
    """What every ground-truth world shares: activations are `features @ directions` plus noise.

    A subclass sets `cfg` (with the `seed` its stream derives from), `directions` [N, d], `probs`
    [N], `parents` and `noise_std`, and says how features are drawn (`sample_features`); `ToySource` streams
    any such world.
    """

    cfg: Any
    directions: torch.Tensor
    probs: torch.Tensor
    parents: list[int | None]  # each feature's parent in a hierarchy (None: a root)
    noise_std: float = 0.0

    @property
    def d_in(self) -> int:
        return self.directions.shape[1]

    @property
    def n_features(self) -> int:
        return self.directions.shape[0]

    @property
    def expected_l0(self) -> float:
        return float(self.probs.sum())

    def interference(self) -> dict[str, float]:
        return interference(self.directions)

    def directions_for(self, sites: list[str] | None) -> torch.Tensor:
        """The true directions [N, width] in the space a dictionary that writes `sites` writes (None:
        the batch's own x). A one-site world has only `directions`; worlds with several sites
        (saelab.toys.circuits) say what each feature writes where."""
        return self.directions

    def parent_child_pairs(self) -> list[tuple[int, int]]:
        """(parent, child) index pairs of the hierarchy (empty for flat worlds)."""
        return [(p, c) for c, p in enumerate(self.parents) if p is not None]

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        features = self.sample_features(n, gen)
        x = features @ self.directions
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(x.shape, generator=gen)
        return Batch(x=x, features=features)


class ToySource:
    """An endless, resumable stream of batches from a LinearWorld (the ActivationSource contract)."""

    def __init__(self, world: LinearWorld, batch_size: int = 1024, seed: int = 0):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive (got {batch_size})")
        self.world = world
        self.batch_size = batch_size
        self.stream_seed = seed + 1_000_003 * (world.cfg.seed + 1)
        self.gen = torch.Generator().manual_seed(self.stream_seed)
        self.position = 0

    @property
    def d_in(self) -> int:
        return self.world.d_in

    @property
    def site_widths(self) -> dict[str, int] | None:
        """Each named site's width for worlds whose batches carry several (saelab.toys.circuits)."""
        widths = getattr(self.world, "site_widths", None)
        return None if widths is None else dict(widths)

    def __iter__(self) -> ToySource:
        return self

    def __next__(self) -> Batch:
        self.position += 1
        return self.world.sample(self.batch_size, self.gen)

    def shard(self, rank: int, world_size: int) -> ToySource:
        """Rank `rank`'s share for data-parallel training (saelab.train.distributed): batches of
        batch_size / world_size rows from an independent stream seeded by (seed, rank, world_size),
        so ranks draw different samples and none generates the others'."""
        if world_size == 1:
            return self
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size={self.batch_size} cannot be split evenly over {world_size} ranks; "
                f"use a multiple of {world_size}"
            )
        if self.position:
            raise ConfigError("shard a toy source before drawing from it")
        digest = hashlib.blake2b(f"{self.stream_seed}/{rank}/{world_size}".encode(), digest_size=8).digest()
        part = copy.copy(self)
        part.batch_size = self.batch_size // world_size
        part.gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return part

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.gen.get_state(), "position": torch.tensor(self.position, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(state["generator"])
        self.position = int(state["position"])
