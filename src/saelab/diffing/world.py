"""A ground-truth "two models" world for crosscoder diffing, and the scores against its truth.

Sparse features fire once per token and are written into two sites, `base` and `ft` (the two
models' activations, width d each), by known per-model directions. Every feature has one unit
direction u_i in one frame of d dimensions (superposition when there are more features than d);
what each model writes depends on its category:

| category     | base writes       | ft writes                    | true r | true cos(base, ft) |
|--------------|-------------------|------------------------------|--------|--------------------|
| `shared`     | u_i               | u_i                          | 0.5    | 1                  |
| `base_only`  | u_i               | 0                            | 0      | -                  |
| `ft_only`    | 0                 | u_i                          | 1      | -                  |
| `rescaled`   | `rescale` * u_i   | u_i                          | 1/(1+s)| 1                  |
| `recombined` | u_i               | unit(c u_i + sqrt(1-c^2) u_p)| 0.5    | ~c                 |

A rescaled feature is weak in the base (s < 1): the case where an L1 crosscoder shrinks the base
part to zero and calls it fine-tune-only (Complete Shrinkage, caught by a high nu_eps). A
recombined feature is equally strong in both, but the fine-tune writes it along a mix of its own
direction and a partner shared feature's u_p (cosine `recombine_cos`): r = 0.5, yet it changed.
Because an L1 penalty on per-site decoder norms costs the same for one shared latent as for a
base-only plus a fine-tune-only pair, an L1 crosscoder may also split shared features
(Latent Decoupling, caught by a high nu_r); BatchTopK pays one slot per latent and should not.

    world = DiffWorld({"d": 32})
    batch = world.sample(1024, torch.Generator().manual_seed(0))  # sites base, ft; features
    score = score_diff(crosscoder, world)                          # categories against the truth
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from saelab.activations.base import Batch
from saelab.config import StrictModel
from saelab.diffing.crosscoder import CATEGORIES, Thresholds, categorize, decoder_parts, model_slots, relative_norms
from saelab.errors import ConfigError
from saelab.evals.core import match_latents, unit_rows
from saelab.toys.features import embed_directions

TRUE_CATEGORIES = ("shared", "base_only", "ft_only", "rescaled", "recombined")


class DiffWorldSpec(StrictModel):
    """A two-model world: how many features of each category, how they fire."""

    d: PositiveInt = Field(32, description="Width of each model's site.")
    n_shared: int = Field(32, ge=0, description="Features both models write the same way.")
    n_base_only: int = Field(8, ge=0, description="Features only the base writes.")
    n_ft_only: int = Field(8, ge=0, description="Features only the fine-tune writes.")
    n_rescaled: int = Field(8, ge=0, description="Features the base writes `rescale` times as strongly.")
    n_recombined: int = Field(8, ge=0, description="Features the fine-tune writes along a mixed direction.")
    rescale: PositiveFloat = Field(0.3, description="|base part| / |ft part| of a rescaled feature.")
    recombine_cos: float = Field(0.5, ge=0, le=1, description="Cosine between a recombined feature's two parts.")
    firing_prob: float = Field(0.04, gt=0, le=1, description="Probability that a feature fires on a token.")
    magnitude: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.5, 1.5), strict=False, description="Active magnitudes are uniform in this range."
    )
    noise_std: NonNegativeFloat = Field(0.0, description="Std of Gaussian noise added to each site.")
    seed: int = Field(0, description="Seed for the directions (sampling takes its own generator).")

    @property
    def counts(self) -> dict[str, int]:
        return {
            "shared": self.n_shared,
            "base_only": self.n_base_only,
            "ft_only": self.n_ft_only,
            "rescaled": self.n_rescaled,
            "recombined": self.n_recombined,
        }


class DiffWorld:
    """Features written into sites `base` and `ft`; `sample` gives `Batch(x=[base | ft], sites, features)`.

    (`true_relative_norms`, not `relative_norms`: the generic evaluation scores worlds with the
    latter by their a/b categories, which these are not.)

    Ground truth: `categories` (per feature, in TRUE_CATEGORIES order), `parts["base"|"ft"]`
    [N, d] (what a unit activation writes into each model), `true_relative_norms` [N] and
    `cosines` [N] (between the two parts; 0 where one is absent).
    """

    sites = ("base", "ft")

    def __init__(self, spec: dict[str, Any] | DiffWorldSpec | None = None):
        cfg = self.cfg = spec if isinstance(spec, DiffWorldSpec) else DiffWorldSpec.parse(dict(spec or {}))
        self.categories = [c for c, n in cfg.counts.items() for _ in range(n)]
        n = len(self.categories)
        if n == 0:
            raise ConfigError("the world has no features; set n_shared, n_base_only, n_ft_only, ... above 0")
        if cfg.n_recombined and not cfg.n_shared:
            raise ConfigError("recombined features mix in a shared feature's direction; set n_shared > 0")
        u = embed_directions(n, cfg.d, 0.0, cfg.seed)
        base, ft = u.clone(), u.clone()
        cat = self.categories
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        shared = [i for i, c in enumerate(cat) if c == "shared"]
        c = cfg.recombine_cos
        for i, kind in enumerate(cat):
            if kind == "base_only":
                ft[i] = 0
            elif kind == "ft_only":
                base[i] = 0
            elif kind == "rescaled":
                base[i] = cfg.rescale * u[i]
            elif kind == "recombined":
                p = shared[int(torch.randint(len(shared), (1,), generator=gen))]
                ft[i] = unit_rows(c * u[i] + math.sqrt(max(0.0, 1 - c * c)) * u[p])
        self.parts = {"base": base.contiguous(), "ft": ft.contiguous()}
        nb, nf = base.norm(dim=1), ft.norm(dim=1)
        self.true_relative_norms = nf / (nb + nf)
        den = nb * nf
        self.cosines = torch.where(den > 0, (base * ft).sum(1) / den.clamp_min(1e-30), torch.zeros_like(den))

    @property
    def n_features(self) -> int:
        return len(self.categories)

    @property
    def directions(self) -> torch.Tensor:
        """[N, 2d] what a unit activation writes into [base | ft] (the generic ground-truth metrics
        of `saelab.evals` match a crosscoder's decoder rows against these)."""
        return torch.cat([self.parts["base"], self.parts["ft"]], 1)

    def directions_for(self, sites: list[str] | None) -> torch.Tensor:
        """What each feature writes into `sites` (None or [base, ft]: the joint directions; one site: its part)."""
        if sites is None:
            return self.directions
        unknown = [s for s in sites if s not in self.parts]
        if unknown:
            raise ConfigError(f"a diffing world has sites 'base' and 'ft', not {unknown}")
        return torch.cat([self.parts[s] for s in sites], 1).contiguous()

    def parent_child_pairs(self) -> list[tuple[int, int]]:
        return []  # flat: no hierarchy

    @property
    def d_in(self) -> int:
        return 2 * self.cfg.d

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        cfg = self.cfg
        active = torch.rand(n, self.n_features, generator=gen) < cfg.firing_prob
        lo, hi = cfg.magnitude
        f = active * (lo + (hi - lo) * torch.rand(n, self.n_features, generator=gen))
        base, ft = f @ self.parts["base"], f @ self.parts["ft"]
        if cfg.noise_std > 0:
            base = base + cfg.noise_std * torch.randn(base.shape, generator=gen)
            ft = ft + cfg.noise_std * torch.randn(ft.shape, generator=gen)
        return Batch(x=torch.cat([base, ft], 1), features=f, sites={"base": base, "ft": ft})

    def batches(self, n_batches: int, batch_size: int = 1024, seed: int = 0):
        """A rewindable stream for `saelab.train`: a callable returning a fresh generator."""

        def make():
            gen = torch.Generator().manual_seed(seed)
            for _ in range(n_batches):
                yield self.sample(batch_size, gen)

        return make

    def expected_categories(self, thresholds: Thresholds = Thresholds()) -> list[str]:
        """The category (of CATEGORIES) each feature's true relative norm gives."""
        return categorize(self.true_relative_norms, thresholds)


class StageWorld:
    """One model's site of a DiffWorld on one data distribution, for stage-wise diffing
    (`saelab.diffing.stages`): `model` picks the part written (`base` or `ft`), `data` which
    features fire. Base data never fires the fine-tune-only features (the fine-tune's new
    concepts are absent from the base's data, as a planted trigger is); fine-tune data fires
    every feature. So only the model changes rescaled and recombined features, and fine-tune-only
    features appear only with both the fine-tuned model and its data.
    """

    def __init__(self, world: DiffWorld, model: str, data: str):
        for name, value in (("model", model), ("data", data)):
            if value not in DiffWorld.sites:
                raise ConfigError(f"stage {name} must be 'base' or 'ft', not {value!r}")
        self.world, self.model, self.data = world, model, data
        self.cfg = world.cfg  # ToySource derives its stream from cfg.seed
        fires = torch.ones(world.n_features)
        if data == "base":
            fires[[i for i, c in enumerate(world.categories) if c == "ft_only"]] = 0
        self.fires = fires

    @property
    def d_in(self) -> int:
        return self.world.cfg.d

    @property
    def categories(self) -> list[str]:
        return self.world.categories

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        f = self.world.sample(n, gen).features * self.fires
        x = f @ self.world.parts[self.model]
        if self.world.cfg.noise_std > 0:
            x = x + self.world.cfg.noise_std * torch.randn(x.shape, generator=gen)
        return Batch(x=x, features=f)


@dataclass
class DiffScore:
    """A crosscoder's diff categories scored against a DiffWorld's truth."""

    category_accuracy: dict[str, float]  # per true category: matched latents whose r gives the expected category
    confusion: dict[str, dict[str, int]]  # true category -> category assigned by the matched latent's r
    recovered: dict[str, float]  # per true category: matched with joint decoder cosine >= threshold
    exclusive_latents: dict[str, int]  # labelled base_only / ft_only (alive)
    false_exclusive: dict[str, dict[str, int]]  # label -> true category of the feature its part matches (not exclusive)
    exclusive_precision: float  # labelled exclusives whose part matches a feature exclusive to that model
    threshold: float
    exclusive_truth: dict[int, str]  # labelled exclusive latent -> true category of the feature its part matches

    def as_dict(self) -> dict:
        return asdict(self)


def _training_parts(sae: Any, world: DiffWorld, slots: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The world's parts in the crosscoder's training space (each site times its norm scale)."""
    scale = sae.site_norm_scale.detach().float().cpu()
    return {"base": world.parts["base"] * scale[slots[0]], "ft": world.parts["ft"] * scale[slots[1]]}


@torch.no_grad()
def score_diff(
    sae: Any,
    world: DiffWorld,
    thresholds: Thresholds = Thresholds(),
    alive: torch.Tensor | None = None,
    threshold: float = 0.9,
) -> DiffScore:
    """Score the crosscoder's categories against the world.

    Per true feature: its latent is matched one-to-one (Hungarian) by the cosine of joint decoder
    rows [d^base | d^ft] with the feature's joint part, both in the training space; the matched
    latent's r assigns a category. Per exclusive latent (r below base_max or above ft_min, among
    `alive` latents if given): its own model's part is matched to the feature whose part in that
    model it points along; the label is right when that feature is exclusive to that model, else
    the truth it hides (a shrunk `rescaled`, a split `shared`, ...) is counted in `false_exclusive`.
    """
    slots = model_slots(sae)
    if sae.cfg.d_in != world.d_in:
        raise ConfigError(f"the crosscoder reads width {sae.cfg.d_in}; this world's two sites are {world.d_in} wide")
    db, df = decoder_parts(sae, slots)
    parts = _training_parts(sae, world, slots)
    joint_true = unit_rows(torch.cat([parts["base"], parts["ft"]], 1))
    cos = joint_true @ unit_rows(torch.cat([db, df], 1)).t()
    latents = match_latents(cos)
    r = relative_norms(sae, slots)
    assigned_all = categorize(r, thresholds)
    expected = world.expected_categories(thresholds)
    accuracy, confusion, recovered = {}, {}, {}
    for cat in TRUE_CATEGORIES:
        rows = [i for i, c in enumerate(world.categories) if c == cat]
        if not rows:
            continue
        got = [assigned_all[int(latents[i])] if latents[i] >= 0 else None for i in rows]
        confusion[cat] = {a: sum(g == a for g in got) for a in CATEGORIES}
        accuracy[cat] = sum(g == expected[i] for g, i in zip(got, rows, strict=True)) / len(rows)
        matched = torch.tensor([float(cos[i, latents[i]]) if latents[i] >= 0 else -1.0 for i in rows])
        recovered[cat] = float((matched >= threshold).float().mean())
    alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool) if alive is None else alive.bool().cpu()
    label_truth = {"base_only": "base_only", "ft_only": "ft_only"}
    counts = {"base_only": 0, "ft_only": 0}
    false = {"base_only": {}, "ft_only": {}}
    right = 0
    truth_of = {}
    for j, a in enumerate(assigned_all):
        if a not in counts or not bool(alive[j]):
            continue
        counts[a] += 1
        model = "base" if a == "base_only" else "ft"
        part = db[j] if model == "base" else df[j]
        present = parts[model].norm(dim=1) > 0
        sims = unit_rows(parts[model]) @ unit_rows(part)
        sims[~present] = -2.0
        truth = truth_of[j] = world.categories[int(sims.argmax())]
        if truth == label_truth[a]:
            right += 1
        else:
            false[a][truth] = false[a].get(truth, 0) + 1
    n_exc = counts["base_only"] + counts["ft_only"]
    return DiffScore(
        category_accuracy=accuracy,
        confusion=confusion,
        recovered=recovered,
        exclusive_latents=counts,
        false_exclusive=false,
        exclusive_precision=right / n_exc if n_exc else float("nan"),
        threshold=threshold,
        exclusive_truth=truth_of,
    )
