"""Toy models of superposition (Elhage et al. 2022): x' = ReLU(W^T W x + b).

N features x_i ~ U[0, 1] fire with probability p = 1 - S and carry importance I_i; the model
compresses them into d < N hidden dimensions and is trained on sum_i I_i (x_i - x'_i)^2. Many
instances (one per sparsity, importance or restart) train at once as a batched model, so a whole
phase diagram costs seconds on a CPU. The trained hidden layer h = W x is also an activation
source (`TMSWorld`) whose true feature directions are W's columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from saelab.config import StrictModel
from saelab.toys.features import LinearWorld


class TMSConfig(StrictModel):
    """One sweep of toy models: an instance per entry of `feature_probs`."""

    n_features: PositiveInt = Field(20, description="Number of input features N.")
    d_hidden: PositiveInt = Field(5, description="Hidden dimensions d (< N for superposition).")
    feature_probs: list[float] = Field(
        [1.0, 0.3, 0.1, 0.03, 0.01, 0.003], description="Firing probability p = 1 - S of each instance."
    )
    importance_decay: float = Field(0.9, gt=0, le=1, description="Importance of feature i is decay**i.")
    steps: PositiveInt = Field(3000, description="Adam steps.")
    batch_size: PositiveInt = Field(1024, description="Samples per step.")
    lr: PositiveFloat = Field(1e-3, description="Adam learning rate.")
    seed: int = Field(0, description="Seed for initialisation and data.")

    @field_validator("feature_probs")
    @classmethod
    def _probs(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one firing probability")
        bad = [p for p in v if not 0 < p <= 1]
        if bad:
            raise ValueError(f"firing probabilities must lie in (0, 1]; got {bad}")
        return v


def sample_tms_features(n: int, probs: torch.Tensor, n_features: int, gen: torch.Generator) -> torch.Tensor:
    """[I, n, N] features: U[0,1] where a Bernoulli(p_instance) fires, else 0."""
    mags = torch.rand(len(probs), n, n_features, generator=gen)
    fire = torch.rand(len(probs), n, n_features, generator=gen) < probs[:, None, None]
    return mags * fire


def train_tms_batched(
    n_features: int,
    d_hidden: int,
    probs: torch.Tensor,
    importance: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train one model per row of `probs` / `importance` ([I] and [I, N]). Returns W [I, d, N],
    b [I, N] and the final loss per instance (averaged over the last 10% of steps)."""
    gen = torch.Generator().manual_seed(seed)
    inst = len(probs)
    w = torch.empty(inst, d_hidden, n_features)
    torch.nn.init.xavier_normal_(w, generator=gen)
    w.requires_grad_(True)
    b = torch.zeros(inst, n_features, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    tail = torch.zeros(inst)
    tail_steps = max(1, steps // 10)
    for step in range(steps):
        x = sample_tms_features(batch_size, probs, n_features, gen)
        h = torch.einsum("ibn,idn->ibd", x, w)
        out = torch.relu(torch.einsum("ibd,idn->ibn", h, w) + b[:, None, :])
        per_inst = (importance[:, None, :] * (x - out).pow(2)).mean(dim=(1, 2))
        opt.zero_grad(set_to_none=True)
        per_inst.sum().backward()
        opt.step()
        if step >= steps - tail_steps:
            tail += per_inst.detach() / tail_steps
    return w.detach(), b.detach(), tail


@dataclass
class TMSGeometry:
    """Geometry of one trained instance (Elhage et al. 2022, section 'feature dimensionality')."""

    feature_prob: float
    n_represented: int  # features with ||W_i|| > 0.5
    dimensions_per_feature: float  # d / ||W||_F^2
    norms: list[float] = field(default_factory=list)  # ||W_i|| per feature
    dimensionality: list[float] = field(default_factory=list)  # D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2
    loss: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def tms_geometry(w: torch.Tensor, feature_prob: float, loss: float = float("nan")) -> TMSGeometry:
    """Per-feature norms and dimensionality of one instance's W [d, N]."""
    cols = w.t()  # [N, d]
    norms = cols.norm(dim=1)
    unit = cols / norms.clamp_min(1e-12)[:, None]
    overlap = (unit @ cols.t()).pow(2).sum(1)  # sum_j (W_i_hat . W_j)^2, includes j = i
    dim = norms.pow(2) / overlap.clamp_min(1e-12)
    return TMSGeometry(
        feature_prob=float(feature_prob),
        n_represented=int((norms > 0.5).sum()),
        dimensions_per_feature=float(w.shape[0] / w.pow(2).sum().clamp_min(1e-12)),
        norms=norms.tolist(),
        dimensionality=dim.tolist(),
        loss=float(loss),
    )


@dataclass
class TMSResult:
    cfg: TMSConfig
    W: torch.Tensor  # [I, d, N]
    b: torch.Tensor  # [I, N]
    importance: torch.Tensor  # [N]
    geometry: list[TMSGeometry]


def train_tms(cfg: TMSConfig | dict | None = None) -> TMSResult:
    """Train the sweep: one instance per firing probability, same importance profile."""
    cfg = cfg if isinstance(cfg, TMSConfig) else TMSConfig.parse(cfg or {})
    probs = torch.tensor(cfg.feature_probs)
    importance = cfg.importance_decay ** torch.arange(cfg.n_features, dtype=torch.float32)
    w, b, loss = train_tms_batched(
        cfg.n_features,
        cfg.d_hidden,
        probs,
        importance.expand(len(probs), -1),
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        cfg.seed,
    )
    geo = [tms_geometry(w[i], cfg.feature_probs[i], float(loss[i])) for i in range(len(probs))]
    return TMSResult(cfg, w, b, importance, geo)


@dataclass
class PhaseDiagram:
    """Elhage et al.'s 2-features-in-1-dimension phase diagram: for each (feature prob, relative
    importance of feature 2), whether feature 2 is ignored (0), gets the dimension alone (1), or
    shares it with feature 1 in superposition (2, antipodal)."""

    feature_probs: list[float]
    relative_importance: list[float]
    phase: list[list[int]]  # [len(relative_importance)][len(feature_probs)]

    def as_dict(self) -> dict:
        return asdict(self)


def phase_diagram(
    feature_probs: list[float] | None = None,
    relative_importance: list[float] | None = None,
    restarts: int = 3,
    steps: int = 2000,
    seed: int = 0,
) -> PhaseDiagram:
    """Train every cell (and `restarts` inits per cell, keeping the lowest loss) as one batched model."""
    ps = feature_probs or torch.logspace(0, -2, 8).tolist()
    ri = relative_importance or torch.logspace(-1, 1, 8).tolist()
    grid = [(p, r) for r in ri for p in ps for _ in range(restarts)]
    probs = torch.tensor([g[0] for g in grid])
    imp = torch.tensor([[1.0, g[1]] for g in grid])
    w, _, loss = train_tms_batched(2, 1, probs, imp, steps, 512, 1e-2, seed)
    w, loss = w.view(len(ri), len(ps), restarts, 1, 2), loss.view(len(ri), len(ps), restarts)
    best = loss.argmin(-1)
    phase = []
    for i in range(len(ri)):
        row = []
        for j in range(len(ps)):
            wij = w[i, j, best[i, j], 0]
            n1, n2 = abs(float(wij[0])), abs(float(wij[1]))
            row.append(0 if n2 < 0.5 else (1 if n1 < 0.5 else 2))
        phase.append(row)
    return PhaseDiagram(list(map(float, ps)), list(map(float, ri)), phase)


def plot_tms(result: TMSResult, diagram: PhaseDiagram | None, path) -> None:
    """Features represented vs sparsity, per-feature dimensionality, and the phase diagram."""
    from saelab.io.atomic import save_figure
    from saelab.plotting import new_figure

    fig, axes = new_figure(ncols=3 if diagram else 2, size=(4.2, 3.6))
    ax = axes[0]
    ps = [g.feature_prob for g in result.geometry]
    ax[0].plot(ps, [g.n_represented for g in result.geometry], "o-")
    ax[0].axhline(result.cfg.d_hidden, ls="--", c="grey", lw=1, label="d (no superposition)")
    ax[0].set(
        xscale="log",
        xlabel="feature probability 1 - S",
        ylabel="features represented (||W_i|| > 0.5)",
        title=f"TMS: N={result.cfg.n_features}, d={result.cfg.d_hidden}",
    )
    ax[0].invert_xaxis()
    ax[0].legend(fontsize=8)
    for g in result.geometry:
        ax[1].scatter([1 / g.feature_prob] * len(g.dimensionality), g.dimensionality, s=8, alpha=0.6)
        ax[1].plot([1 / g.feature_prob], [g.dimensions_per_feature], "k_", ms=14)
    ax[1].set(
        xscale="log", xlabel="1 / (1 - S)", ylabel="feature dimensionality D_i", title="geometry (bar: d/||W||_F^2)"
    )
    if diagram:
        from matplotlib.colors import ListedColormap

        im = ax[2].imshow(
            diagram.phase,
            origin="lower",
            aspect="auto",
            vmin=0,
            vmax=2,
            cmap=ListedColormap(["#dddddd", "#4c72b0", "#dd8452"]),
        )
        ax[2].set_xticks(
            range(len(diagram.feature_probs)), [f"{p:.2g}" for p in diagram.feature_probs], rotation=60, fontsize=7
        )
        ax[2].set_yticks(
            range(len(diagram.relative_importance)), [f"{r:.2g}" for r in diagram.relative_importance], fontsize=7
        )
        ax[2].set(xlabel="feature probability", ylabel="importance of feature 2", title="2 features, 1 dim")
        cbar = fig.colorbar(im, ax=ax[2], ticks=[0, 1, 2])
        cbar.ax.set_yticklabels(["ignored", "dedicated", "superposed"], fontsize=7)
    for a in ax[:2]:
        a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


class TMSWorldConfig(StrictModel):
    """A trained toy model used as a ground-truth world (see TMSWorld)."""

    n_features: PositiveInt = Field(20, description="Input features N.")
    d_hidden: PositiveInt = Field(5, description="Hidden dimensions (the SAE's d_in).")
    feature_prob: float = Field(0.05, gt=0, le=1, description="Firing probability of each feature.")
    importance_decay: float = Field(1.0, gt=0, le=1, description="Importance of feature i is decay**i.")
    steps: PositiveInt = Field(3000, description="Adam steps to train the toy model.")
    seed: int = Field(0, description="Seed of the toy model.")


class TMSWorld(LinearWorld):
    """The hidden layer of one trained toy model as a ground-truth world: h = W x, the true
    features are x and their directions are W's columns (unnormalised, as the model wrote them)."""

    def __init__(self, cfg: TMSWorldConfig | dict | None = None):
        if not isinstance(cfg, TMSWorldConfig):
            cfg = TMSWorldConfig.parse(cfg or {})
        self.cfg = cfg
        imp = cfg.importance_decay ** torch.arange(cfg.n_features, dtype=torch.float32)
        w, b, loss = train_tms_batched(
            cfg.n_features, cfg.d_hidden, torch.tensor([cfg.feature_prob]), imp[None], cfg.steps, 1024, 1e-3, cfg.seed
        )
        self.W, self.b = w[0], b[0]
        self.directions = self.W.t().contiguous()
        self.probs = torch.full((cfg.n_features,), cfg.feature_prob)
        self.parents = [None] * cfg.n_features
        self.geometry = tms_geometry(self.W, cfg.feature_prob, float(loss[0]))

    def sample_features(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return sample_tms_features(n, self.probs[:1], self.cfg.n_features, gen)[0]
