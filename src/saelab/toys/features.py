"""Ground-truth toy worlds: sparse true features embedded in superposition.

A world has N true features, each with a firing probability and a magnitude distribution, and a
unit direction in d dimensions. An activation is x = sum_i a_i * direction_i (+ noise), and every
batch carries the true feature activations a, so metrics can compare an SAE with the truth.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from saelab.activations.base import Batch
from saelab.config import StrictModel
from saelab.errors import ConfigError


class ToyWorldConfig(StrictModel):
    """Independent sparse features with controlled interference."""

    n_features: PositiveInt = Field(256, description="Number of true features N.")
    d: PositiveInt = Field(64, description="Embedding dimension (the SAE's d_in).")
    firing: Literal["uniform", "zipf"] = Field("uniform", description="How firing probabilities vary across features.")
    firing_prob: float = Field(0.02, gt=0, le=1, description="Mean firing probability (expected L0 = N * firing_prob).")
    zipf_exponent: NonNegativeFloat = Field(1.0, description="p_i proportional to 1/(i+1)^exponent when firing='zipf'.")
    magnitude_mean: float = Field(1.0, description="Mean magnitude of an active feature.")
    magnitude_std: NonNegativeFloat = Field(0.0, description="Std of an active feature's magnitude (clipped at 0).")
    target_cos_sim: float = Field(
        0.0, ge=0, lt=1, description="Target cosine similarity between feature directions (interference)."
    )
    noise_std: NonNegativeFloat = Field(0.0, description="Std of isotropic Gaussian noise added to x.")
    seed: int = Field(0, description="Seed for directions and firing probabilities (not for sampling).")

    @model_validator(mode="after")
    def _check(self):
        if self.magnitude_mean <= 0:
            raise ValueError(f"magnitude_mean must be > 0 (got {self.magnitude_mean}); features are non-negative")
        return self


def firing_probabilities(cfg: ToyWorldConfig) -> torch.Tensor:
    if cfg.firing == "uniform":
        return torch.full((cfg.n_features,), cfg.firing_prob)
    ranks = torch.arange(1, cfg.n_features + 1, dtype=torch.float64)
    p = ranks.pow(-cfg.zipf_exponent)
    p = p * (cfg.firing_prob * cfg.n_features / p.sum())
    if p.max() > 1:  # clip and spread the excess over the unclipped features, keeping the mean
        for _ in range(50):
            over = p > 1
            excess = (p[over] - 1).sum()
            p[over] = 1
            free = ~over & (p < 1)
            if excess <= 1e-12 or not free.any():
                break
            p[free] += excess * p[free] / p[free].sum()
    return p.float().clamp(max=1.0)


def embed_directions(n: int, d: int, target_cos_sim: float, seed: int, steps: int = 400) -> torch.Tensor:
    """Unit directions [n, d] whose pairwise cosine similarities are as close to the target as possible.

    With n <= d and target 0 the directions are exactly orthonormal. Otherwise gradient descent
    on the squared deviation of every off-diagonal cosine from the target (for n > d and target 0
    this is the frame potential, whose minimisers are tight frames: the least interference possible).
    """
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

    A subclass sets `cfg` (with `d` and `noise_std`), `directions` [N, d] and `probs` [N], and
    says how features are drawn (`sample_features`); `ToySource` streams any such world.
    """

    @property
    def d_in(self) -> int:
        return self.cfg.d

    @property
    def expected_l0(self) -> float:
        return float(self.probs.sum())

    def interference(self) -> dict[str, float]:
        return interference(self.directions)

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        features = self.sample_features(n, gen)
        x = features @ self.directions
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(x.shape, generator=gen)
        return Batch(x=x, features=features)


class ToyWorld(LinearWorld):
    """A fixed world (directions and probabilities); sampling takes an explicit generator."""

    def __init__(self, cfg: ToyWorldConfig | dict | None = None):
        self.cfg = cfg if isinstance(cfg, ToyWorldConfig) else ToyWorldConfig.parse(cfg or {})
        self.directions = embed_directions(self.cfg.n_features, self.cfg.d, self.cfg.target_cos_sim, self.cfg.seed)
        self.probs = firing_probabilities(self.cfg)

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        active = torch.rand(n, self.cfg.n_features, generator=gen) < self.probs
        mags = self.cfg.magnitude_mean + self.cfg.magnitude_std * torch.randn(n, self.cfg.n_features, generator=gen)
        return active * mags.clamp_min(0)


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
