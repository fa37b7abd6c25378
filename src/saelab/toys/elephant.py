"""The elephant world: entities that are exactly a bundle of attributes, a small model that reads
them, and a fine-tune that teaches it a new fact.

Attributes come in three groups (colour, size, class); each entity has one value per group, and
no two entities have the same three. Entity 0 of the list is the **elephant**: grey + big +
mammal. The model's representation of entity e is

    h(e) = sum of its attribute directions  (+ label_norm * l_e when `label` is on),

with orthonormal attribute directions and labels orthonormal to them (and to each other while
they fit). Without the label, "elephant" is *exactly* grey + big + mammal: nothing in the
activation tells it apart from the sum.

A row (a "token") holds a few entities: each fires independently with a Zipf-like probability
(mean `entity_rate` per row, the elephant at rank `elephant_rank`) and a magnitude around 1,
and x = sum_e m_e h(e) + Gaussian noise. `Batch.features` holds the m_e.

The model's circuits are linear read-outs fitted by logistic regression on its own rows
(`fit_heads`), as a model would learn them: one per attribute (`is_grey`, ...) and
`afraid_of_mice`, which fires when the elephant is there. The **fine-tune** (`finetune`) teaches
a new fact that `n_zoo` entities have (`lives_in_zoo`, the elephant and two others): by gradient
descent it learns a new direction z added to those entities' representations and a new head
reading it, while the old heads stay what they were (frozen, and kept accurate by their own
losses in the objective). Only the zoo entities' representations move. The fine-tune's data
over-samples the zoo entities (`zoo_oversample`), so the model and the data change separately,
as stage-wise diffing needs.

The base geometry (attributes, labels, their norms) is set rather than learned because it is the
experiment's controlled variable: whether "elephant" has a direction of its own must be a switch,
not an outcome of training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from saelab.activations.base import Batch
from saelab.config import StrictModel
from saelab.errors import ConfigError
from saelab.toys.features import LinearWorld, ToySource, embed_directions

ATTRIBUTE_GROUPS = {
    "colour": ("grey", "brown", "white", "black", "green", "pink"),
    "size": ("big", "medium", "small"),
    "class": ("mammal", "bird", "reptile", "fish"),
}
ELEPHANT = ("grey", "big", "mammal")
OLD_FACT = "afraid_of_mice"
NEW_FACT = "lives_in_zoo"


class ElephantSpec(StrictModel):
    """The world, the model's geometry and the two data distributions."""

    d: PositiveInt = Field(48, description="Width of the model's representation (the dictionary's d_in).")
    n_entities: PositiveInt = Field(24, description="Entities, the elephant among them (at most 72).")
    label: bool = Field(False, description="Give each entity its own label direction on top of its attributes.")
    label_norm: PositiveFloat = Field(1.0, description="Norm of a label direction (attribute directions have norm 1).")
    entity_rate: PositiveFloat = Field(1.2, description="Mean entities per row on the base data.")
    zipf_exponent: NonNegativeFloat = Field(1.0, description="Entity at frequency rank r fires with p ~ 1/(r+1)^exp.")
    elephant_rank: int = Field(8, ge=0, description="The elephant's frequency rank (0: the most frequent entity).")
    magnitude_std: NonNegativeFloat = Field(0.15, description="Std of an active entity's magnitude around 1.")
    noise_std: NonNegativeFloat = Field(0.05, description="Std of isotropic Gaussian noise on each row.")
    n_zoo: PositiveInt = Field(3, description="Entities that have the new fact (the elephant and n_zoo - 1 others).")
    zoo_oversample: PositiveFloat = Field(
        4.0, description="How much more often zoo entities fire on the fine-tune data."
    )
    seed: int = Field(0, description="Seed of the entities' bundles, the directions and the zoo.")

    @model_validator(mode="after")
    def _check(self):
        n_attr = sum(len(v) for v in ATTRIBUTE_GROUPS.values())
        combos = 1
        for values in ATTRIBUTE_GROUPS.values():
            combos *= len(values)
        if self.n_entities > combos:
            raise ValueError(f"n_entities={self.n_entities} exceeds the {combos} distinct attribute bundles")
        if self.n_entities < 2:
            raise ValueError("n_entities must be at least 2 (the elephant and one other)")
        if self.elephant_rank >= self.n_entities:
            raise ValueError(f"elephant_rank={self.elephant_rank} must be below n_entities={self.n_entities}")
        if self.n_zoo > self.n_entities:
            raise ValueError(f"n_zoo={self.n_zoo} exceeds n_entities={self.n_entities}")
        if self.d <= n_attr:
            raise ValueError(f"d={self.d} must exceed the {n_attr} attributes so labels and new facts have room")
        return self


def attribute_names() -> list[str]:
    return [name for values in ATTRIBUTE_GROUPS.values() for name in values]


class EntityModel(torch.nn.Module):
    """The model: entity representations (attributes + optional labels + learned new facts) and
    linear read-out heads on them. `representations()` is [n_entities, d]."""

    def __init__(self, spec: ElephantSpec | dict[str, Any] | None = None):
        super().__init__()
        spec = spec if isinstance(spec, ElephantSpec) else ElephantSpec.parse(dict(spec or {}))
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        self.attributes = attribute_names()
        self.entity_names, bundles = _entities(spec.n_entities, gen)
        n_attr = len(self.attributes)
        member = torch.zeros(spec.n_entities, n_attr)
        for e, bundle in enumerate(bundles):
            member[e, [self.attributes.index(a) for a in bundle]] = 1.0
        self.bundles = bundles
        basis = embed_directions(spec.d, spec.d, 0.0, spec.seed + 17)  # a random orthonormal basis
        self.register_buffer("membership", member)
        self.register_buffer("attribute_directions", basis[:n_attr].clone())
        comp = basis[n_attr:]
        coords = embed_directions(spec.n_entities, comp.shape[0], 0.0, spec.seed + 18)
        labels = (coords @ comp) * spec.label_norm if spec.label else torch.zeros(spec.n_entities, spec.d)
        self.register_buffer("labels", labels)
        others = torch.randperm(spec.n_entities - 1, generator=gen)[: spec.n_zoo - 1] + 1
        zoo = torch.zeros(spec.n_entities)
        zoo[0] = 1.0
        zoo[others] = 1.0
        self.register_buffer("zoo", zoo)
        self.new_fact = torch.nn.Parameter(torch.zeros(spec.d), requires_grad=False)  # z; zero before the fine-tune
        self.heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def elephant(self) -> int:
        return 0

    @property
    def zoo_entities(self) -> list[int]:
        return self.zoo.nonzero().squeeze(1).tolist()

    def attribute_direction(self, name: str) -> torch.Tensor:
        return self.attribute_directions[self.attributes.index(name)]

    def representations(self) -> torch.Tensor:
        """h(e) for every entity: its attributes' sum, its label, and the new fact where it has it."""
        return self.membership @ self.attribute_directions + self.labels + self.zoo[:, None] * self.new_fact[None, :]

    def head_targets(self, name: str) -> torch.Tensor:
        """[n_entities] 1 where a head should fire for that entity."""
        if name == OLD_FACT:
            t = torch.zeros(len(self.entity_names))
            t[self.elephant] = 1.0
            return t
        if name == NEW_FACT:
            return self.zoo.clone()
        if name.startswith("is_") and name[3:] in self.attributes:
            return self.membership[:, self.attributes.index(name[3:])].clone()
        raise KeyError(f"no head '{name}'; heads: {OLD_FACT}, {NEW_FACT}, is_<attribute>")

    def row_targets(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """[B] whether a row holds an entity the head should fire for."""
        return ((features > 0).float() @ self.head_targets(name).to(features.device) > 0).float()

    def read(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The head's logit on rows x [B, d]."""
        w, b = self.heads[name]
        return x @ w + b


def entity_probs(model: EntityModel, data: str) -> torch.Tensor:
    """[n_entities] firing probabilities: Zipf over ranks (the elephant at `elephant_rank`, the
    others in list order), mean `entity_rate` per row; on 'ft' the zoo entities fire
    `zoo_oversample` times as often (clipped below 1)."""
    if data not in ("base", "ft"):
        raise ConfigError(f"data must be 'base' or 'ft', not {data!r}")
    spec = model.spec
    n = spec.n_entities
    ranks = list(range(n))
    ranks.remove(spec.elephant_rank)
    ranks = [spec.elephant_rank, *ranks]  # entity e's rank
    w = torch.tensor([(r + 1.0) ** -spec.zipf_exponent for r in ranks])
    p = (w * spec.entity_rate / w.sum()).clamp(max=0.95)
    if data == "ft":
        p = torch.where(model.zoo > 0, (p * spec.zoo_oversample).clamp(max=0.95), p)
    return p


class ElephantWorld(LinearWorld):
    """Rows of one model on one data distribution: x = features @ h (+ noise), features the
    entities' magnitudes. A `LinearWorld`, so `ToySource` streams it (and it resumes exactly)."""

    def __init__(self, model: EntityModel, data: str = "base"):
        self.model = model
        self.cfg = model.spec
        self.data = data
        self.directions = model.representations().detach().clone()
        self.probs = entity_probs(model, data)
        self.parents = [None] * model.spec.n_entities
        self.noise_std = model.spec.noise_std

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        active = torch.rand(n, len(self.probs), generator=gen) < self.probs
        mags = 1.0 + self.cfg.magnitude_std * torch.randn(active.shape, generator=gen)
        return active * mags.clamp_min(0)


def source(model: EntityModel, data: str = "base", batch_size: int = 256, seed: int = 0) -> ToySource:
    """An activation source of the model's rows on `data` ('base' or 'ft')."""
    return ToySource(ElephantWorld(model, data), batch_size=batch_size, seed=seed)


def rows(model: EntityModel, data: str, n: int, seed: int) -> Batch:
    """n held-out rows (their own generator, so they never overlap a training stream's)."""
    return ElephantWorld(model, data).sample(n, torch.Generator().manual_seed(10_007 + seed))


def balanced_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = logits > 0
    pos, neg = target > 0, target <= 0
    tpr = (pred & pos).sum() / pos.sum().clamp_min(1)
    tnr = (~pred & neg).sum() / neg.sum().clamp_min(1)
    return float((tpr + tnr) / 2)


def _logistic_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced logistic loss, averaged over heads (columns): a rare fact (the elephant is in
    a tenth of the rows) counts as much as its absence."""
    pos = target.mean(0).clamp(1e-3, 1 - 1e-3)
    weight = torch.where(target > 0, 0.5 / pos, 0.5 / (1 - pos))
    return (weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")).mean()


def _targets(model: EntityModel, names: list[str], features: torch.Tensor) -> torch.Tensor:
    return torch.stack([model.row_targets(n, features) for n in names], 1)


def head_accuracy(model: EntityModel, data: str, seed: int = 0, n_rows: int = 4096) -> dict[str, float]:
    """Balanced accuracy of every head on held-out rows of the model on `data`."""
    held = rows(model, data, n_rows, seed)
    return {n: balanced_accuracy(model.read(n, held.x), model.row_targets(n, held.features)) for n in model.heads}


def fit_heads(
    model: EntityModel, names: list[str], data: str = "base", n_rows: int = 8192, l2: float = 1e-4, seed: int = 0
) -> None:
    """Fit heads `names` by class-balanced, lightly L2-regularised logistic regression on the
    model's rows (L-BFGS, all heads in one solve): the read-outs a model trained on these facts
    would have."""
    batch = ElephantWorld(model, data).sample(n_rows, torch.Generator().manual_seed(seed))
    target = _targets(model, names, batch.features)
    w = torch.zeros(model.spec.d, len(names), requires_grad=True)
    b = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _logistic_loss(batch.x @ w + b, target) + l2 * w.pow(2).sum(0).mean()
        loss.backward()
        return loss

    opt.step(closure)
    for i, name in enumerate(names):
        model.heads[name] = (w[:, i].detach().clone(), b[i].detach().clone())


def base_model(spec: ElephantSpec | dict[str, Any] | None = None, seed: int = 0) -> EntityModel:
    """The base model with its fitted heads: afraid_of_mice and one per attribute."""
    model = EntityModel(spec)
    fit_heads(model, [OLD_FACT, *(f"is_{a}" for a in model.attributes)], seed=seed)
    return model


@dataclass
class FinetuneResult:
    model: EntityModel
    new_fact_norm: float  # |z|
    accuracy: dict[str, float]  # balanced accuracy of every head on held-out fine-tune rows
    losses: list[float]


def finetune(
    base: EntityModel, steps: int = 200, lr: float = 0.05, l2: float = 0.01, n_rows: int = 1024, seed: int = 0
) -> FinetuneResult:
    """Teach the base model `lives_in_zoo` by gradient descent (Adam): a new direction z added to
    the zoo entities' representations and a new head, on the fine-tune data; the old heads are
    frozen but their losses stay in the objective (so z must not break them), and an L2 penalty
    `l2` on z and the new head keeps the new direction at a finite, attribute-like norm (logistic
    loss alone grows it without bound). Returns a new model."""
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 31)
    z = torch.nn.Parameter(0.01 * torch.randn(model.spec.d, generator=gen))
    w = torch.nn.Parameter(0.01 * torch.randn(model.spec.d, generator=gen))
    b = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([z, w, b], lr=lr)
    world = ElephantWorld(model, "ft")
    fixed = model.membership @ model.attribute_directions + model.labels
    old = list(model.heads)
    old_w = torch.stack([model.heads[n][0] for n in old], 1)
    old_b = torch.stack([model.heads[n][1] for n in old])
    losses = []
    for _ in range(steps):
        feats = world.sample_features(n_rows, gen)
        x = feats @ (fixed + model.zoo[:, None] * z[None, :])
        x = x + model.spec.noise_std * torch.randn(x.shape, generator=gen)
        loss = _logistic_loss(x @ w + b, model.row_targets(NEW_FACT, feats))
        loss = loss + _logistic_loss(x @ old_w + old_b, _targets(model, old, feats)) + l2 * (z.dot(z) + w.dot(w))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        model.new_fact.copy_(z.detach())
    model.heads[NEW_FACT] = (w.detach().clone(), b.detach().clone())
    return FinetuneResult(model, float(z.detach().norm()), head_accuracy(model, "ft", seed), losses)


def _entities(n: int, gen: torch.Generator) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The elephant first, then n - 1 other distinct bundles drawn at random."""
    groups = list(ATTRIBUTE_GROUPS.values())
    combos = [(c, s, k) for c in groups[0] for s in groups[1] for k in groups[2]]
    combos.remove(ELEPHANT)
    picks = torch.randperm(len(combos), generator=gen)[: n - 1].tolist()
    bundles = [ELEPHANT, *(combos[i] for i in picks)]
    names = ["elephant", *(f"{c}-{s}-{k}" for c, s, k in bundles[1:])]
    return names, bundles
