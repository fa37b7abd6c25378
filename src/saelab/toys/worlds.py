"""Composable ground-truth worlds: a feature-activation sampler + an embedding + optional noise.

Every world yields `Batch(x, features)` with `x = features @ directions (+ noise)`, exposes its
true `directions [N, d]`, marginal firing `probs [N]` and `parents` (the hierarchy, `None` for a
root), so pathology metrics can compare an SAE with the truth. Samplers are vectorised over the
batch: the only Python loops run over hierarchy levels and mutually-exclusive groups.

Kinds (the `kind` key of a world spec):
- `independent`: Bernoulli features with uniform or Zipf-like probabilities;
- `correlated`: a Gaussian copula with equicorrelated groups (rho > 0 correlated, < 0 anti);
- `hierarchy`: trees where a child can fire only if its parent fires, optional mutually
  exclusive children, any depth (explicit `nodes` or a generated forest);
- `bundle`: the "elephant" world: sparse entity features whose directions lie
  in the span of a few dense attribute features, plus an optional entity-specific label.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from saelab.errors import ConfigError
from saelab.toys.features import LinearWorld, embed_directions


class _WorldBase(BaseModel):
    """Embedding, magnitude and noise settings every world shares."""

    model_config = ConfigDict(extra="forbid", strict=True)

    d: PositiveInt = Field(64, description="Embedding dimension (the SAE's d_in).")
    magnitude_mean: float = Field(1.0, gt=0, description="Mean magnitude of an active feature.")
    magnitude_std: NonNegativeFloat = Field(0.0, description="Std of an active feature's magnitude (clipped at 0).")
    target_cos_sim: float = Field(0.0, ge=0, lt=1, description="Target cosine between feature directions.")
    noise_std: NonNegativeFloat = Field(0.0, description="Std of isotropic Gaussian noise added to x.")
    seed: int = Field(0, description="Seed for directions and structure (not for sampling).")


class IndependentSpec(_WorldBase):
    """Independent sparse features (the foundation's toy world, as a composable kind)."""

    kind: Literal["independent"] = "independent"
    n_features: PositiveInt = Field(256, description="Number of true features N.")
    firing: Literal["uniform", "zipf"] = Field("uniform", description="How firing probabilities vary.")
    firing_prob: float = Field(0.02, gt=0, le=1, description="Mean firing probability.")
    zipf_exponent: NonNegativeFloat = Field(1.0, description="p_i ~ 1/(i+1)^exponent when firing='zipf'.")


class CorrelatedSpec(IndependentSpec):
    """Features in consecutive groups of `group_size` share a copula correlation `correlation`."""

    kind: Literal["correlated"] = "correlated"  # type: ignore[assignment]
    group_size: PositiveInt = Field(4, description="Features per correlated group (N must be a multiple).")
    correlation: float = Field(0.7, gt=-1, lt=1, description="Latent Gaussian correlation within a group (<0: anti).")

    @model_validator(mode="after")
    def _check_groups(self):
        if self.n_features % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide n_features={self.n_features}; change either")
        if self.group_size > 1 and self.correlation <= -1 / (self.group_size - 1):  # at the bound it is singular
            raise ValueError(
                f"correlation={self.correlation} is impossible for groups of {self.group_size} "
                f"(needs correlation > {-1 / (self.group_size - 1):.3f}); use pairs (group_size=2) for strong anti-correlation"
            )
        return self


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    parent: int | None = Field(None, description="Index of the parent node (None: a root).")
    prob: float = Field(description="Firing probability (for a child: given that its parent fires).")
    mutually_exclusive_children: bool = Field(False, description="At most one child of this node fires.")


class HierarchySpec(_WorldBase):
    """Trees of features: either explicit `nodes` or a generated forest (n_roots, branching, depth)."""

    kind: Literal["hierarchy"] = "hierarchy"
    nodes: list[NodeSpec] | None = Field(None, description="Explicit nodes; overrides the generated forest.")
    n_roots: PositiveInt = Field(16, description="Generated forest: number of trees.")
    branching: PositiveInt = Field(3, description="Generated forest: children per node.")
    depth: PositiveInt = Field(2, description="Generated forest: levels (1 = roots only).")
    root_prob: float = Field(0.1, description="Generated forest: root firing probability.")
    child_prob: float = Field(0.3, description="Generated forest: child probability given its parent.")
    mutually_exclusive: bool = Field(False, description="Generated forest: siblings are mutually exclusive.")

    @model_validator(mode="after")
    def _check_tree(self):
        for name in ("root_prob", "child_prob"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name}={v} is not a probability; use a value in [0, 1]")
        for i, node in enumerate(self.resolved_nodes()):
            if not 0 <= node.prob <= 1:
                raise ValueError(f"nodes[{i}].prob={node.prob} is not a probability; use a value in [0, 1]")
        parents = [n.parent for n in self.resolved_nodes()]
        for i, p in enumerate(parents):
            if p is not None and not 0 <= p < len(parents):
                raise ValueError(
                    f"nodes[{i}].parent={p} does not exist; parents must index one of the {len(parents)} nodes"
                )
            if p == i:
                raise ValueError(f"nodes[{i}].parent={p} is the node itself; set parent to another node or None")
        _depths(parents)  # raises on cycles
        nodes = self.resolved_nodes()
        for i, node in enumerate(nodes):
            if node.mutually_exclusive_children:
                total = sum(c.prob for c in nodes if c.parent == i)
                if total > 1 + 1e-9:
                    raise ValueError(
                        f"nodes[{i}] has mutually exclusive children whose probs sum to {total:.3f} > 1; lower them"
                    )
        return self

    def resolved_nodes(self) -> list[NodeSpec]:
        if self.nodes is not None:
            return self.nodes
        nodes, frontier = [], []
        for _ in range(self.n_roots):
            nodes.append(
                NodeSpec(parent=None, prob=self.root_prob, mutually_exclusive_children=self.mutually_exclusive)
            )
            frontier.append(len(nodes) - 1)
        for _ in range(self.depth - 1):
            nxt = []
            for parent in frontier:
                for _ in range(self.branching):
                    nodes.append(
                        NodeSpec(
                            parent=parent, prob=self.child_prob, mutually_exclusive_children=self.mutually_exclusive
                        )
                    )
                    nxt.append(len(nodes) - 1)
            frontier = nxt
        return nodes


class BundleSpec(_WorldBase):
    """The elephant world: entity e's direction is the normalised sum of its attributes' directions,
    mixed with an orthogonal label direction l_e with weight `label_weight`."""

    kind: Literal["bundle"] = "bundle"
    n_attributes: PositiveInt = Field(16, description="Dense attribute features (orthonormal directions).")
    n_entities: PositiveInt = Field(96, description="Sparse entity features.")
    attributes_per_entity: PositiveInt = Field(3, description="Attributes in each entity's bundle.")
    entity_prob: float = Field(0.03, ge=0, le=1, description="Entity firing probability.")
    attribute_prob: float = Field(0.2, ge=0, le=1, description="Probability an attribute fires on its own.")
    label_weight: float = Field(0.5, ge=0, lt=1, description="Weight of the entity's own label direction (0: none).")

    @model_validator(mode="after")
    def _check_dims(self):
        if self.attributes_per_entity > self.n_attributes:
            raise ValueError(
                f"attributes_per_entity={self.attributes_per_entity} exceeds n_attributes={self.n_attributes}"
            )
        if self.d < self.n_attributes:
            raise ValueError(
                f"d={self.d} is smaller than n_attributes={self.n_attributes}; attributes need orthogonal directions, "
                "raise d or lower n_attributes"
            )
        if self.label_weight > 0 and self.d <= self.n_attributes:
            raise ValueError(
                f"label_weight>0 needs d > n_attributes (got d={self.d}, n_attributes={self.n_attributes}) so labels "
                "can be orthogonal to the attributes; raise d or set label_weight=0"
            )
        return self


WorldSpec = Annotated[IndependentSpec | CorrelatedSpec | HierarchySpec | BundleSpec, Field(discriminator="kind")]
_ADAPTER = TypeAdapter(WorldSpec)
KINDS = ("independent", "correlated", "hierarchy", "bundle")


def parse_world_spec(values: dict[str, Any] | BaseModel) -> BaseModel:
    """Validate a world spec dict; errors name the field (and the valid keys for unknown ones)."""
    if isinstance(values, BaseModel):
        return values
    values = dict(values or {})
    kind = values.setdefault("kind", "independent")
    if kind not in KINDS:
        raise ConfigError(f"unknown world kind '{kind}'; valid kinds: {', '.join(KINDS)}")
    try:
        return _ADAPTER.validate_python(values)
    except ValidationError as exc:
        model = {
            "independent": IndependentSpec,
            "correlated": CorrelatedSpec,
            "hierarchy": HierarchySpec,
            "bundle": BundleSpec,
        }[kind]
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if str(p) != kind]
            where = ".".join(loc) or "world"
            quoted = f"'{where}'" if where.isprintable() else repr(where)  # one line whatever the key
            if err["type"] == "extra_forbidden":
                lines.append(
                    f"unknown key {quoted} for a {kind} world; valid keys: {', '.join(sorted(model.model_fields))}"
                )
            else:
                msg = " ".join(err["msg"].removeprefix("Value error, ").split())
                lines.append(f"{kind} world: {msg}" if where == "world" else f"{kind} world {quoted}: {msg}")
        raise ConfigError("; ".join(lines)) from None


def _depths(parents: list[int | None]) -> list[int]:
    """Depth of each node; raises ValueError naming a node on a cycle."""
    depth: list[int | None] = [None] * len(parents)
    for start in range(len(parents)):
        path, node = [], start
        while node is not None and depth[node] is None:
            if node in path:
                raise ValueError(
                    f"nodes[{node}] is on a parent cycle {path[path.index(node) :] + [node]}; a hierarchy must be a forest"
                )
            path.append(node)
            node = parents[node]
        base = -1 if node is None else depth[node]
        for i, n in enumerate(reversed(path)):
            depth[n] = base + 1 + i
    return [int(d) for d in depth]  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- samplers
def _magnitudes(spec: _WorldBase, active: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mags = spec.magnitude_mean + spec.magnitude_std * torch.randn(active.shape, generator=gen)
    return active * mags.clamp_min(0)


def firing_probabilities(cfg: IndependentSpec) -> torch.Tensor:
    """Per-feature firing probabilities with mean `firing_prob`: equal, or Zipf-like and clipped at 1."""
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


class IndependentSampler:
    def __init__(self, spec: IndependentSpec):
        self.spec = spec
        self.probs = firing_probabilities(spec)

    def active(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(n, len(self.probs), generator=gen) < self.probs


class CorrelatedSampler(IndependentSampler):
    """Gaussian copula: z ~ N(0, C) with C block-equicorrelated; feature i fires when z_i < Phi^-1(p_i),
    so marginals are exactly p_i and the sign of the firing correlation follows `correlation`."""

    def __init__(self, spec: CorrelatedSpec):
        super().__init__(spec)
        g = spec.group_size
        block = torch.full((g, g), spec.correlation, dtype=torch.float64)
        block.fill_diagonal_(1.0)
        self.chol = torch.linalg.cholesky(block).float()  # [g, g]
        self.cut = torch.special.ndtri(self.probs.double().clamp(1e-12, 1 - 1e-12)).float()

    def active(self, n: int, gen: torch.Generator) -> torch.Tensor:
        g = self.spec.group_size
        eps = torch.randn(n, self.spec.n_features // g, g, generator=gen)
        z = (eps @ self.chol.t()).reshape(n, -1)
        return z < self.cut


class HierarchySampler:
    """Level by level: a child fires with its probability only where its parent fired; children of
    a mutually-exclusive node are drawn as one categorical (at most one fires)."""

    def __init__(self, spec: HierarchySpec):
        self.spec = spec
        nodes = spec.resolved_nodes()
        self.parents = [n.parent for n in nodes]
        self.depths = _depths(self.parents)
        self.node_probs = torch.tensor([n.prob for n in nodes])
        self.levels = []  # per level: (independent idx, parent idx, [(children idx, parent, cumprobs)])
        for level in range(max(self.depths) + 1):
            idx = [i for i, dep in enumerate(self.depths) if dep == level]
            free = [i for i in idx if self.parents[i] is None or not nodes[self.parents[i]].mutually_exclusive_children]
            groups = {}
            for i in idx:
                p = self.parents[i]
                if p is not None and nodes[p].mutually_exclusive_children:
                    groups.setdefault(p, []).append(i)
            self.levels.append(
                (
                    torch.tensor(free, dtype=torch.long),
                    torch.tensor([-1 if self.parents[i] is None else self.parents[i] for i in free], dtype=torch.long),
                    [(torch.tensor(ch), p, self.node_probs[ch].cumsum(0)) for p, ch in groups.items()],
                )
            )
        marg = torch.zeros(len(nodes))
        for i in sorted(range(len(nodes)), key=lambda i: self.depths[i]):
            marg[i] = self.node_probs[i] * (1.0 if self.parents[i] is None else marg[self.parents[i]])
        self.probs = marg

    def active(self, n: int, gen: torch.Generator) -> torch.Tensor:
        act = torch.zeros(n, len(self.parents), dtype=torch.bool)
        for free, par, groups in self.levels:
            if len(free):
                fire = torch.rand(n, len(free), generator=gen) < self.node_probs[free]
                has_parent = par >= 0
                gate = torch.ones(n, len(free), dtype=torch.bool)
                gate[:, has_parent] = act[:, par[has_parent]]
                act[:, free] = fire & gate
            for children, parent, cum in groups:
                u = torch.rand(n, generator=gen)
                choice = torch.searchsorted(cum, u, right=True)  # == len(children): none fires
                onehot = choice[:, None] == torch.arange(len(children))[None, :]
                act[:, children] = onehot & act[:, parent : parent + 1]
        return act


class BundleSampler:
    """Entities and attributes fire independently; entity directions carry their attribute bundle."""

    def __init__(self, spec: BundleSpec):
        self.spec = spec
        self.probs = torch.cat(
            [torch.full((spec.n_entities,), spec.entity_prob), torch.full((spec.n_attributes,), spec.attribute_prob)]
        )

    def active(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(n, len(self.probs), generator=gen) < self.probs


# ---------------------------------------------------------------------------- the world
class World(LinearWorld):
    """A fixed world (directions, probabilities, structure); sampling takes an explicit generator.

    A `LinearWorld`, so `ToySource` streams it and `saelab train` can name it as a source.
    """

    def __init__(self, spec: dict[str, Any] | BaseModel | None = None):
        self.cfg = parse_world_spec(spec or {})
        cfg = self.cfg
        self.parents: list[int | None]
        self.bundles: list[list[int]] | None = None
        self.label_directions: torch.Tensor | None = None
        if isinstance(cfg, BundleSpec):
            self.sampler = BundleSampler(cfg)
            self.directions, self.bundles, self.label_directions = _bundle_directions(cfg)
            self.attribute_directions = self.directions[cfg.n_entities :]
            self.parents = [None] * (cfg.n_entities + cfg.n_attributes)
        else:
            sampler_cls = {
                "independent": IndependentSampler,
                "correlated": CorrelatedSampler,
                "hierarchy": HierarchySampler,
            }[cfg.kind]
            self.sampler = sampler_cls(cfg)
            n = len(self.sampler.probs)
            self.directions = embed_directions(n, cfg.d, cfg.target_cos_sim, cfg.seed)
            self.parents = list(getattr(self.sampler, "parents", [None] * n))
        self.probs = self.sampler.probs
        self.noise_std = cfg.noise_std

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return _magnitudes(self.cfg, self.sampler.active(n, gen), gen)


def _bundle_directions(cfg: BundleSpec) -> tuple[torch.Tensor, list[list[int]], torch.Tensor | None]:
    """Orthonormal attributes; labels in the attributes' orthogonal complement (in superposition
    there when n_entities > d - n_attributes); entity = unit mix of its bundle and its label."""
    gen = torch.Generator().manual_seed(cfg.seed)
    basis, _ = torch.linalg.qr(torch.randn(cfg.d, cfg.d, generator=gen, dtype=torch.float64))
    basis = basis.t().float()  # rows orthonormal
    attrs = basis[: cfg.n_attributes]
    bundles = [
        sorted(torch.randperm(cfg.n_attributes, generator=gen)[: cfg.attributes_per_entity].tolist())
        for _ in range(cfg.n_entities)
    ]
    member = torch.zeros(cfg.n_entities, cfg.n_attributes)
    for e, b in enumerate(bundles):
        member[e, b] = 1.0
    bundle_dirs = member @ attrs
    bundle_dirs = bundle_dirs / bundle_dirs.norm(dim=1, keepdim=True)
    labels = None
    w = cfg.label_weight
    entity = bundle_dirs
    if w > 0:
        comp = basis[cfg.n_attributes :]  # [d - n_attr, d]
        coords = embed_directions(cfg.n_entities, comp.shape[0], 0.0, cfg.seed + 1)
        labels = coords @ comp
        entity = math.sqrt(1 - w * w) * bundle_dirs + w * labels
        entity = entity / entity.norm(dim=1, keepdim=True)
    return torch.cat([entity, attrs]).contiguous(), bundles, labels


def make_world(spec: dict[str, Any] | BaseModel | None = None) -> World:
    """Build a world from a spec dict such as `{"kind": "hierarchy", "n_roots": 8, "d": 32}`."""
    return World(spec)
