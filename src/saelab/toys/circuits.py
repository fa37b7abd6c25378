"""Ground-truth worlds for dictionaries that read one site and write another (transcoders) or read
and write several (crosscoders).

`TranscoderWorld`: sparse input features f_in fire as in an independent world and are embedded
in superposition at the MLP's input, x_in = f_in E_in. A known sparse map A [n_out, n_in] (each
input feature drives one or two output features; with more connections than outputs some output
features have two drivers) gives the output features f_out = act(f_in A^T + output_bias), embedded
at the MLP's output, y = f_out E_out. Each input feature's column of A is scaled so that its
output direction v_i = sum_j A[j, i] E_out[j] has unit norm: with the default non-negative
weights and zero bias the ReLU never clips, y = f_in V, and a transcoder with one latent per input
feature (encoder along E_in[i], decoder along v_i, activation f_in[i]) is exact. Inhibitory
connections or a negative bias make the map genuinely non-linear.

`CrosscoderWorld`: one feature set read at two sites "a" and "b" (two layers, or one layer of two
models), each of width d. A feature is `shared` (in both), `a_only`, `b_only` or `rescaled` (in
both, its b-part scaled against its a-part by a factor from `rescale`). Shared and rescaled
features have the same direction at both sites (`same_directions`) or independent ones. Each
feature's joint direction [d_a | d_b] has unit norm, so x = [x_a | x_b] = f @ directions exactly,
and its true relative decoder norm is r = |d_b| / (|d_a| + |d_b|): 0.5 shared, 0 a-only, 1 b-only,
s / (1 + s) rescaled by s.

Both are `LinearWorld`s (x = features @ directions for the batch's own x), so `ToySource` streams
them; `directions_for(sites)` gives what each feature writes into the sites a dictionary writes,
which the generic ground-truth metrics compare decoder rows with, and `saelab.evals.circuits`
adds the transcoder and crosscoder recovery metrics.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from saelab.activations.base import Batch
from saelab.config import StrictModel
from saelab.errors import ConfigError
from saelab.toys.features import LinearWorld, embed_directions
from saelab.toys.worlds import _magnitudes, firing_probabilities

CATEGORIES = ("shared", "a_only", "b_only", "rescaled")


class _FiringSpec(StrictModel):
    """How the (input) features fire and how large they are when they do."""

    firing: Literal["uniform", "zipf"] = Field("uniform", description="How firing probabilities vary.")
    firing_prob: float = Field(0.03, gt=0, le=1, description="Mean firing probability of a feature.")
    zipf_exponent: NonNegativeFloat = Field(1.0, description="p_i ~ 1/(i+1)^exponent when firing='zipf'.")
    magnitude_mean: PositiveFloat = Field(1.0, description="Mean magnitude of an active feature.")
    magnitude_std: NonNegativeFloat = Field(0.0, description="Std of an active feature's magnitude (clipped at 0).")
    target_cos_sim: float = Field(0.0, ge=0, lt=1, description="Target cosine between embedded directions.")
    seed: int = Field(0, description="Seed for directions and structure (not for sampling).")


class TranscoderSpec(_FiringSpec):
    """A sparse two-layer 'MLP' between two sites whose feature-to-feature map is known."""

    n_in: PositiveInt = Field(64, description="Input features.")
    d_in: PositiveInt = Field(32, description="Width of the MLP's input site (n_in > d_in: superposition).")
    n_out: PositiveInt = Field(48, description="Output features.")
    d_out: PositiveInt = Field(24, description="Width of the MLP's output site.")
    two_output_fraction: float = Field(0.25, ge=0, le=1, description="Input features that drive two outputs.")
    weight_range: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.5, 1.0), strict=False, description="Connection weights are drawn uniformly from this range (then scaled)."
    )
    inhibitory_fraction: float = Field(
        0.0, ge=0, le=1, description="Chance that a secondary connection is inhibitory (negative)."
    )
    output_bias: float = Field(0.0, le=0, description="Bias of every output feature before the activation (<= 0).")
    activation: Literal["relu", "linear"] = Field("relu", description="The MLP's non-linearity on output features.")

    @property
    def n_features(self) -> int:
        return self.n_in

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.weight_range
        if lo > hi:
            raise ValueError(f"weight_range={list(self.weight_range)} must be (low, high) with low <= high")
        if self.two_output_fraction > 0 and self.n_out < 2:
            raise ValueError("two_output_fraction > 0 needs n_out >= 2; raise n_out or set it to 0")
        return self


class CrosscoderSpec(_FiringSpec):
    """One feature set at two sites: shared, a-only, b-only and rescaled features."""

    d: PositiveInt = Field(32, description="Width of each site.")
    n_shared: int = Field(32, ge=0, description="Features in both sites with equal norm.")
    n_a_only: int = Field(16, ge=0, description="Features only in site a.")
    n_b_only: int = Field(16, ge=0, description="Features only in site b.")
    n_rescaled: int = Field(16, ge=0, description="Features in both sites, b-part scaled by a `rescale` factor.")
    rescale: list[PositiveFloat] = Field(
        [0.5, 2.0], min_length=1, description="|d_b| / |d_a| of rescaled features, cycled over them."
    )
    same_directions: bool = Field(
        False, description="Features in both sites point the same way in each (else independent directions)."
    )
    noise_std: NonNegativeFloat = Field(0.0, description="Std of isotropic Gaussian noise added at each site.")

    @model_validator(mode="after")
    def _check(self):
        if self.n_features == 0:
            raise ValueError("the world has no features; set n_shared, n_a_only, n_b_only or n_rescaled")
        return self

    @property
    def counts(self) -> dict[str, int]:
        return {"shared": self.n_shared, "a_only": self.n_a_only, "b_only": self.n_b_only, "rescaled": self.n_rescaled}

    @property
    def n_features(self) -> int:
        return sum(self.counts.values())


# ---------------------------------------------------------------------------- transcoder world
class TranscoderWorld(LinearWorld):
    """Input features -> a known sparse map -> output features, at sites `mlp_in` and `mlp_out`.

    Ground truth: `input_directions` [n_in, d_in] (E_in, the encoder direction of input feature i's
    latent; also `directions`, as x = f_in E_in), `output_directions` [n_in, d_out] (unit v_i, its
    decoder direction, and `directions_for(["mlp_out"])`),
    `connections` A [n_out, n_in], `output_embedding` E_out [n_out, d_out]. `sample` returns
    `Batch(x=x_in, target=y, features=f_in, sites={"mlp_in": x_in, "mlp_out": y})`.
    """

    read_site = "mlp_in"
    write_site = "mlp_out"

    def __init__(self, spec: dict[str, Any] | TranscoderSpec | None = None):
        cfg = self.cfg = spec if isinstance(spec, TranscoderSpec) else TranscoderSpec.parse(dict(spec or {}))
        self.probs = firing_probabilities(cfg)
        self.parents = [None] * cfg.n_in
        self.input_directions = embed_directions(cfg.n_in, cfg.d_in, cfg.target_cos_sim, cfg.seed)
        self.output_embedding = embed_directions(cfg.n_out, cfg.d_out, cfg.target_cos_sim, cfg.seed + 1)
        self.connections = _connections(cfg)
        v = self.connections.t() @ self.output_embedding  # [n_in, d_out]
        self.connections = self.connections / v.norm(dim=1).clamp_min(1e-12)[None, :]
        self.output_directions = (self.connections.t() @ self.output_embedding).contiguous()
        self.directions = self.input_directions  # x = f_in E_in

    def directions_for(self, sites: list[str] | None) -> torch.Tensor:
        """E_in for a dictionary writing `mlp_in` (or the batch's own x), the v_i for one writing `mlp_out`."""
        by_site = {None: self.input_directions, self.read_site: self.input_directions}
        by_site[self.write_site] = self.output_directions
        key = None if sites is None else tuple(sites)
        key = key[0] if key is not None and len(key) == 1 else key
        if key not in by_site:
            raise ConfigError(f"a transcoder world has sites '{self.read_site}' and '{self.write_site}', not {sites}")
        return by_site[key]

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def site_widths(self) -> dict[str, int]:
        return {self.read_site: self.cfg.d_in, self.write_site: self.cfg.d_out}

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        active = torch.rand(n, self.cfg.n_in, generator=gen) < self.probs
        return _magnitudes(self.cfg, active, gen)

    def output_features(self, features: torch.Tensor) -> torch.Tensor:
        """f_out = act(f_in A^T + output_bias): the MLP in feature coordinates ([B, n_in] -> [B, n_out])."""
        pre = features @ self.connections.t() + self.cfg.output_bias
        return pre.clamp_min(0) if self.cfg.activation == "relu" else pre

    def mlp(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP's output site for input features [B, n_in]: f_out E_out, [B, d_out]."""
        return self.output_features(features) @ self.output_embedding

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        features = self.sample_features(n, gen)
        x = features @ self.input_directions
        y = self.mlp(features)
        return Batch(x=x, features=features, target=y, sites={self.read_site: x, self.write_site: y})


def _connections(cfg: TranscoderSpec) -> torch.Tensor:
    """A [n_out, n_in]: each input's primary output, plus a second for `two_output_fraction` of
    inputs. Targets are dealt from shuffled rounds of all outputs, so every output is driven once
    before any is driven twice (and outputs get two drivers once connections outnumber them)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    n_two = round(cfg.two_output_fraction * cfg.n_in)
    rounds = math.ceil((cfg.n_in + n_two) / cfg.n_out) + 1
    deck = torch.cat([torch.randperm(cfg.n_out, generator=gen) for _ in range(rounds)]).tolist()
    primary = deck[: cfg.n_in]
    rest = deck[cfg.n_in :]
    twos = torch.randperm(cfg.n_in, generator=gen)[:n_two].tolist()
    lo, hi = cfg.weight_range
    weights = lo + (hi - lo) * torch.rand(cfg.n_in + n_two, generator=gen)
    signs = torch.where(torch.rand(n_two, generator=gen) < cfg.inhibitory_fraction, -1.0, 1.0)
    A = torch.zeros(cfg.n_out, cfg.n_in)
    A[primary, torch.arange(cfg.n_in)] = weights[: cfg.n_in]
    for k, i in enumerate(twos):
        j = next(t for t in rest if t != primary[i])  # a second output, never the primary one
        rest.remove(j)
        A[j, i] = signs[k] * weights[cfg.n_in + k]
    return A


# ---------------------------------------------------------------------------- crosscoder world
class CrosscoderWorld(LinearWorld):
    """Features read at sites `a` and `b`; x is their concatenation [x_a | x_b] ([B, 2d]).

    Ground truth: `categories` (one of CATEGORIES per feature, in the order shared, a_only, b_only,
    rescaled), `site_directions[site]` [N, d] (unit, zero where a feature is absent),
    `site_scales[site]` [N] (the norm of the feature's part at that site; a² + b² = 1),
    `relative_norms` [N] (|d_b| / (|d_a| + |d_b|)) and the joint unit `directions` [N, 2d].
    """

    sites = ("a", "b")

    def __init__(self, spec: dict[str, Any] | CrosscoderSpec | None = None):
        cfg = self.cfg = spec if isinstance(spec, CrosscoderSpec) else CrosscoderSpec.parse(dict(spec or {}))
        self.probs = firing_probabilities(cfg)
        self.parents = [None] * cfg.n_features
        self.noise_std = cfg.noise_std
        self.categories = [c for c, n in cfg.counts.items() for _ in range(n)]
        cat = self.categories
        ratio = torch.ones(cfg.n_features)  # |d_b| / |d_a|, inf for b-only
        rescaled = [i for i, c in enumerate(cat) if c == "rescaled"]
        for k, i in enumerate(rescaled):
            ratio[i] = cfg.rescale[k % len(cfg.rescale)]
        in_a = torch.tensor([c != "b_only" for c in cat])
        in_b = torch.tensor([c != "a_only" for c in cat])
        ratio[~in_b] = 0.0
        scale_a = torch.where(in_a, 1 / (1 + ratio.pow(2)).sqrt(), torch.zeros(()))
        scale_b = torch.where(in_a, ratio * scale_a, torch.ones(()))
        scale_b[~in_b] = 0.0
        self.site_scales = {"a": scale_a, "b": scale_b}
        self.relative_norms = scale_b / (scale_a + scale_b)
        self.site_directions = _site_directions(cfg, in_a, in_b)
        self.directions = torch.cat(
            [self.site_directions["a"] * scale_a[:, None], self.site_directions["b"] * scale_b[:, None]], dim=1
        ).contiguous()

    @property
    def d(self) -> int:
        return self.cfg.d

    @property
    def site_widths(self) -> dict[str, int]:
        return {site: self.cfg.d for site in self.sites}

    def directions_for(self, sites: list[str] | None) -> torch.Tensor:
        """The joint directions for [a, b] (or the batch's own x); a site's part (scaled, zero where a
        feature is absent) for one site; parts concatenated in the order given for a list."""
        if sites is None:
            return self.directions
        d = self.cfg.d
        parts = {"a": self.directions[:, :d], "b": self.directions[:, d:]}
        unknown = [s for s in sites if s not in parts]
        if unknown:
            raise ConfigError(f"a crosscoder world has sites 'a' and 'b', not {unknown}")
        return torch.cat([parts[s] for s in sites], dim=1).contiguous()

    def category_indices(self, category: str) -> torch.Tensor:
        return torch.tensor([i for i, c in enumerate(self.categories) if c == category], dtype=torch.long)

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        active = torch.rand(n, self.cfg.n_features, generator=gen) < self.probs
        return _magnitudes(self.cfg, active, gen)

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        batch = super().sample(n, gen)
        d = self.cfg.d
        batch.sites = {"a": batch.x[:, :d], "b": batch.x[:, d:]}
        return batch


def _site_directions(cfg: CrosscoderSpec, in_a: torch.Tensor, in_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unit directions per site (zero rows where absent). With `same_directions` one frame serves
    both sites (features in both share their row); otherwise each site has its own frame."""
    n, d = cfg.n_features, cfg.d
    out = {"a": torch.zeros(n, d), "b": torch.zeros(n, d)}
    if cfg.same_directions:
        frame = embed_directions(n, d, cfg.target_cos_sim, cfg.seed)
        out["a"][in_a], out["b"][in_b] = frame[in_a], frame[in_b]
        return out
    for k, (site, present) in enumerate((("a", in_a), ("b", in_b))):
        m = int(present.sum())
        if m:
            out[site][present] = embed_directions(m, d, cfg.target_cos_sim, cfg.seed + k)
    return out
