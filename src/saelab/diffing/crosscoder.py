"""Crosscoder model diffing: which latents belong to the base model, the fine-tune, or both.

For a crosscoder over two sites, one per model (`base/<hookpoint>` and `ft/<hookpoint>`), every
latent j has a decoder part per model, d_j^base and d_j^ft, whose norms are read in the space the
crosscoder was trained in (each model scaled to mean norm sqrt(d), `SAE.site_decoder_norms`), so
a model's raw scale does not bias them.

- **Relative decoder norm** r_j = |d_j^ft| / (|d_j^base| + |d_j^ft|): 0 base-only, 1 fine-tune-only,
  0.5 shared. `categorize` labels latents base-only (r < base_max), ft-only (r > ft_min), shared
  (within `shared`) or other.
- **Decoder cosine** cos(d_j^base, d_j^ft): r = 0.5 does not mean the latent does the same thing in
  both models; a shared latent whose parts point different ways was changed by the fine-tune.
- **Per-model firing rates**: how often a latent fires from the joint input, and from each
  model's activations alone (the other model's slot set to its decoder bias, so it adds nothing
  to the pre-activations).
- **Latent Scaling** (`latent_scaling`): for an exclusive latent j with decoder direction d (its
  own model's part), the least-squares scale beta = argmin sum_n |y_n - beta f_nj d|^2 over the
  tokens where j fires, in closed form beta = d^T sum_n f_nj y_n / (|d|^2 sum_n f_nj^2), for y =
  each model's reconstruction by the latents (decoder bias left out) and y = each model's error
  with j's own contribution put back (x - x_hat + f_j d_j^model). nu = beta(other model) /
  beta(own model), so for a fine-tune-only latent nu = beta_base / beta_ft. A truly exclusive latent
  has nu ~ 0. A high nu_eps flags **Complete Shrinkage** (the other model's decoder part was
  shrunk to zero, yet its error still holds the direction); a high nu_r flags **Latent
  Decoupling** (the other model expresses the direction through other latents).

All of it is computed in the training space (each model's activations times its
`site_norm_scale`), where both models have the same mean norm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.evals.core import eval_mode

CATEGORIES = ("base_only", "ft_only", "shared", "other")


@dataclass(frozen=True)
class Thresholds:
    """Where relative norms and nu values cut. The defaults follow common practice in the papers."""

    base_max: float = 0.1  # r below: base-only
    ft_min: float = 0.9  # r above: fine-tune-only
    shared: tuple[float, float] = (0.3, 0.7)  # r within: shared
    nu_eps: float = 0.2  # nu_eps above: Complete Shrinkage
    nu_r: float = 0.2  # nu_r above: Latent Decoupling

    def __post_init__(self):
        lo, hi = self.shared
        if not 0 <= self.base_max <= lo <= hi <= self.ft_min <= 1:
            raise ConfigError(
                "thresholds must satisfy 0 <= base_max <= shared[0] <= shared[1] <= ft_min <= 1 "
                f"(got base_max={self.base_max}, shared={self.shared}, ft_min={self.ft_min})"
            )


def model_slots(sae: Any, base: str | None = None, ft: str | None = None) -> tuple[int, int]:
    """Indices of the base and the fine-tuned model's sites among the crosscoder's sites.

    Default: the site whose alias is `base` (`base/...`) and the other one; a crosscoder of two
    sites without aliases takes them in order (base first). `base`/`ft` name sites or aliases.
    """
    sites = sae.cfg.read_sites
    if sites is None or len(sites) < 2 or sae.cfg.is_transcoder:
        raise ConfigError(
            "model diffing needs a crosscoder over one site per model (site: [base/HOOK, ft/HOOK]); "
            f"this dictionary reads {sites or 'the batch x'}"
        )

    def find(name: str | None, default: int | None) -> int:
        if name is None:
            if default is None:
                raise ConfigError(f"the crosscoder reads {len(sites)} sites {sites}; name the base and ft sites")
            return default
        hits = [i for i, s in enumerate(sites) if s == name or s.split("/", 1)[0] == name]
        if len(hits) != 1:
            raise ConfigError(f"site {name!r} names {len(hits)} of the crosscoder's sites {sites}; name one of them")
        return hits[0]

    aliases = [s.split("/", 1)[0] for s in sites]
    default_base = aliases.index("base") if "base" in aliases else (0 if len(sites) == 2 else None)
    b = find(base, default_base)
    default_ft = (1 - b) if len(sites) == 2 else (aliases.index("ft") if "ft" in aliases else None)
    f = find(ft, default_ft)
    if b == f:
        raise ConfigError(f"base and ft name the same site {sites[b]!r}")
    return b, f


@torch.no_grad()
def decoder_parts(sae: Any, slots: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(d^base, d^ft): [d_sae, d] each, in the training space (raw parts times site_norm_scale)."""
    n = sae.cfg.n_sites
    w = sae.W_dec.detach().float().cpu().reshape(sae.cfg.d_sae, n, -1)
    scale = sae.site_norm_scale.detach().float().cpu()
    return w[:, slots[0]] * scale[slots[0]], w[:, slots[1]] * scale[slots[1]]


@torch.no_grad()
def relative_norms(sae: Any, slots: tuple[int, int] | None = None) -> torch.Tensor:
    """[d_sae] r = |d^ft| / (|d^base| + |d^ft|) (0.5 for a latent with no decoder at all)."""
    b, f = slots or model_slots(sae)
    norms = sae.site_decoder_norms().detach().float().cpu()
    nb, nf = norms[:, b], norms[:, f]
    total = nb + nf
    return torch.where(total > 0, nf / total.clamp_min(1e-30), torch.full_like(total, 0.5))


def categorize(r: torch.Tensor, thresholds: Thresholds = Thresholds()) -> list[str]:
    """The category (one of CATEGORIES) each relative norm assigns."""
    lo, hi = thresholds.shared
    out = []
    for v in r.tolist():
        if v < thresholds.base_max:
            out.append("base_only")
        elif v > thresholds.ft_min:
            out.append("ft_only")
        elif lo <= v <= hi:
            out.append("shared")
        else:
            out.append("other")
    return out


@torch.no_grad()
def decoder_cosines(sae: Any, slots: tuple[int, int] | None = None) -> torch.Tensor:
    """[d_sae] cosine between each latent's base and fine-tune decoder parts (0 where one is zero)."""
    db, df = decoder_parts(sae, slots or model_slots(sae))
    den = db.norm(dim=1) * df.norm(dim=1)
    return torch.where(den > 0, (db * df).sum(1) / den.clamp_min(1e-30), torch.zeros_like(den))


@dataclass
class ScalingSums:
    """Running sums of Latent Scaling for a set of latents, per model (index 0 base, 1 ft)."""

    latents: torch.Tensor  # [m] latent ids
    own: torch.Tensor  # [m] the model whose decoder part is d (0 base, 1 ft)
    f2: torch.Tensor  # [m] sum_n f_nj^2
    recon: torch.Tensor  # [m, 2] sum_n f_nj d^T y_r,n for y_r = model's reconstruction (no bias)
    error: torch.Tensor  # [m, 2] sum_n f_nj d^T y_eps,n for y_eps = model's error with j put back
    d2: torch.Tensor  # [m] |d|^2
    active: torch.Tensor  # [m] tokens where j fires


@dataclass
class LatentScaling:
    """Per exclusive latent: its betas per model and nu = beta(other) / beta(own)."""

    latents: list[int]
    category: list[str]  # base_only / ft_only
    beta_recon: list[list[float]]  # [m][base, ft]
    beta_error: list[list[float]]
    nu_r: list[float]
    nu_eps: list[float]
    active_tokens: list[int]
    complete_shrinkage: list[bool]  # nu_eps above the threshold
    latent_decoupling: list[bool]  # nu_r above the threshold

    def as_dict(self) -> dict:
        return asdict(self)


def closed_form_beta(f: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """beta = d^T sum_n f_n y_n / (|d|^2 sum_n f_n^2): the least-squares scale of f_n d to y_n.

    `f` [n] activations, `y` [n, dim] targets, `d` [dim] a decoder direction; tokens with f = 0
    add nothing to either sum, so passing only the active tokens gives the same beta.
    """
    return (f @ (y @ d)) / (d.dot(d) * f.dot(f)).clamp_min(1e-30)


def _views(sae: Any, batches: Iterable, slots: tuple[int, int]):
    """(x, f, x_hat, width) per batch, x and x_hat in the training space."""
    sites = sae.cfg.read_sites
    scale = sae.site_norm_scale.detach().float()
    n, width = sae.cfg.n_sites, sae.cfg.d_in // sae.cfg.n_sites
    device = sae.W_enc.device
    for b in batches:
        b = b if isinstance(b, Batch) else Batch(x=torch.as_tensor(b))
        x = b.view(sites).x.to(device, torch.float32)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        s = scale.to(device).repeat_interleave(width)
        yield x * s, f, x_hat * s, (n, width)


@torch.no_grad()
def latent_scaling(
    sae: Any,
    batches: Iterable,
    latents: torch.Tensor | list[int],
    own: torch.Tensor | list[int],
    slots: tuple[int, int] | None = None,
    thresholds: Thresholds = Thresholds(),
) -> LatentScaling:
    """Latent Scaling of `latents`, each with the model whose decoder part is its direction d
    (`own`: 0 base, 1 ft; a ft-only latent has own 1). See the module docstring."""
    slots = slots or model_slots(sae)
    latents = torch.as_tensor(latents, dtype=torch.long)
    own = torch.as_tensor(own, dtype=torch.long)
    m = len(latents)
    db, df = decoder_parts(sae, slots)
    parts = torch.stack([db[latents], df[latents]], 1)  # [m, 2, dim]: each latent's part per model
    d = parts[torch.arange(m), own]  # [m, dim] the direction fitted
    sums = ScalingSums(
        latents, own, torch.zeros(m), torch.zeros(m, 2), torch.zeros(m, 2), (d * d).sum(1), torch.zeros(m)
    )
    bias = sae.b_dec.detach().float().cpu()
    scale = sae.site_norm_scale.detach().float().cpu()
    with eval_mode(sae):
        for x, f, x_hat, (_n, width) in _views(sae, batches, slots):
            x, f, x_hat = x.cpu(), f.detach().float().cpu(), x_hat.cpu()
            fj = f[:, latents]  # [B, m]
            sums.f2 += (fj * fj).sum(0)
            sums.active += (fj > 0).sum(0)
            for k, slot in enumerate(slots):
                sl = slice(slot * width, (slot + 1) * width)
                recon = x_hat[:, sl] - bias[sl] * scale[slot]  # the latents' part of the reconstruction
                err = x[:, sl] - x_hat[:, sl]
                sums.recon[:, k] += (fj * (recon @ d.t())).sum(0)
                # y_eps = err + f_j d_j^model: its projection on d adds f_j (d_j^model . d)
                own_dot = (parts[:, k] * d).sum(1)  # [m]
                sums.error[:, k] += (fj * (err @ d.t())).sum(0) + (fj * fj).sum(0) * own_dot
    den = (sums.d2 * sums.f2).clamp_min(1e-30)[:, None]
    beta_r, beta_e = sums.recon / den, sums.error / den
    ar = torch.arange(m)
    other = 1 - own

    def nu(beta: torch.Tensor) -> torch.Tensor:
        mine = beta[ar, own]
        return torch.where(mine.abs() > 1e-12, beta[ar, other] / mine, torch.full_like(mine, float("nan")))

    nu_r, nu_e = nu(beta_r), nu(beta_e)
    return LatentScaling(
        latents=latents.tolist(),
        category=["ft_only" if int(o) == 1 else "base_only" for o in own],
        beta_recon=beta_r.tolist(),
        beta_error=beta_e.tolist(),
        nu_r=nu_r.tolist(),
        nu_eps=nu_e.tolist(),
        active_tokens=sums.active.long().tolist(),
        complete_shrinkage=[bool(v > thresholds.nu_eps) for v in nu_e.tolist()],
        latent_decoupling=[bool(v > thresholds.nu_r) for v in nu_r.tolist()],
    )


@torch.no_grad()
def firing_rates(sae: Any, batches: Iterable, slots: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Per latent, the fraction of tokens it fires on: from the joint input (`joint`), from the base
    model's activations alone (`base`) and from the fine-tune's alone (`ft`). Alone means the other
    model's slot holds its decoder bias, so it adds nothing to the pre-activations."""
    slots = slots or model_slots(sae)
    width = sae.cfg.d_in // sae.cfg.n_sites
    counts = {k: torch.zeros(sae.cfg.d_sae) for k in ("joint", "base", "ft")}
    n = 0
    with eval_mode(sae):
        for b in batches:
            b = b if isinstance(b, Batch) else Batch(x=torch.as_tensor(b))
            x = b.view(sae.cfg.read_sites).x.to(sae.W_enc.device, torch.float32)
            counts["joint"] += (sae.encode(x) > 0).sum(0).cpu()
            for name, keep in (("base", slots[0]), ("ft", slots[1])):
                alone = sae.b_dec.detach().expand_as(x).clone()
                sl = slice(keep * width, (keep + 1) * width)
                alone[:, sl] = x[:, sl]
                counts[name] += (sae.encode(alone) > 0).sum(0).cpu()
            n += len(x)
    return {k: v / max(n, 1) for k, v in counts.items()}


@dataclass
class DiffResult:
    """Everything a crosscoder diff reports; `as_dict` is results.json."""

    sites: dict[str, str]  # base / ft -> site name
    thresholds: dict[str, Any]
    counts: dict[str, int]  # per category, among alive latents
    dead: int  # latents that never fired on the batches (left out of the counts)
    tokens: int
    relative_norms: list[float] = field(repr=False)
    categories: list[str] = field(repr=False)
    decoder_cosines: list[float] = field(repr=False)
    shared_cosine: dict[str, float] = field(default_factory=dict)  # mean/median over shared latents
    firing: dict[str, list[float]] = field(repr=False, default_factory=dict)
    scaling: LatentScaling | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def exclusive(self) -> list[dict[str, Any]]:
        """One row per exclusive latent: id, category, r, firing rates, betas and nu, flags."""
        s = self.scaling
        if s is None:
            return []
        rows = []
        for i, j in enumerate(s.latents):
            rows.append(
                {
                    "latent": j,
                    "category": s.category[i],
                    "r": self.relative_norms[j],
                    "fires_joint": self.firing["joint"][j],
                    "fires_base": self.firing["base"][j],
                    "fires_ft": self.firing["ft"][j],
                    "nu_r": s.nu_r[i],
                    "nu_eps": s.nu_eps[i],
                    "complete_shrinkage": s.complete_shrinkage[i],
                    "latent_decoupling": s.latent_decoupling[i],
                }
            )
        return rows


def diff_crosscoder(
    sae: Any,
    batches: Iterable,
    base: str | None = None,
    ft: str | None = None,
    thresholds: Thresholds = Thresholds(),
) -> DiffResult:
    """The whole diff of a two-model crosscoder on held-out `batches` (a list: it is read twice)."""
    batches = list(batches)
    if not batches:
        raise ConfigError("diffing needs at least one batch of held-out activations")
    slots = model_slots(sae, base, ft)
    r = relative_norms(sae, slots)
    cats = categorize(r, thresholds)
    cos = decoder_cosines(sae, slots)
    rates = firing_rates(sae, batches, slots)
    alive = rates["joint"] > 0
    counts = {c: sum(1 for j, k in enumerate(cats) if k == c and bool(alive[j])) for c in CATEGORIES}
    shared = torch.tensor([c == "shared" for c in cats]) & alive
    shared_cos = cos[shared]
    exclusive = [j for j, c in enumerate(cats) if c in ("base_only", "ft_only") and bool(alive[j])]
    own = [1 if cats[j] == "ft_only" else 0 for j in exclusive]
    scaling = latent_scaling(sae, batches, exclusive, own, slots, thresholds) if exclusive else None
    sites = sae.cfg.read_sites
    return DiffResult(
        sites={"base": sites[slots[0]], "ft": sites[slots[1]]},
        thresholds=asdict(thresholds),
        counts=counts,
        dead=int((~alive).sum()),
        tokens=sum(len(b.x if isinstance(b, Batch) else b) for b in batches),
        relative_norms=r.tolist(),
        categories=cats,
        decoder_cosines=cos.tolist(),
        shared_cosine=(
            {"mean": float(shared_cos.mean()), "median": float(shared_cos.median()), "n": int(shared.sum())}
            if len(shared_cos)
            else {"n": 0}
        ),
        firing={k: v.tolist() for k, v in rates.items()},
        scaling=scaling,
    )
