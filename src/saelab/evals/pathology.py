"""SAE pathologies measured against a toy world's ground truth.

Each metric is a plain function returning a dataclass. Latents are matched to true features
one-to-one by the Hungarian algorithm on decoder cosines, so one latent cannot stand for two
features. Where a metric asks whether a latent "carries" a feature on a token, it compares what
the latent writes along the true direction, f * (d_latent . u), with the feature's true
magnitude, so tiny leaky activations of L1 SAEs do not count as firing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.evals.core import match_latents, unit_rows
from saelab.sae.base import SAE


# ---------------------------------------------------------------------------- shared pieces
def _check_dirs(sae: SAE, directions: torch.Tensor) -> torch.Tensor:
    if directions.dim() != 2 or directions.shape[1] != sae.cfg.d_in:
        raise ConfigError(
            f"true directions must be [n_features, d_in={sae.cfg.d_in}] (got {tuple(directions.shape)}); "
            "pass world.directions of the world the SAE was trained on"
        )
    return unit_rows(directions.detach().float().cpu())


def decoder_cosines(sae: SAE, directions: torch.Tensor) -> torch.Tensor:
    """[n_features, d_sae] cosines between true directions and decoder rows."""
    return _check_dirs(sae, directions) @ unit_rows(sae.W_dec.detach().float().cpu()).t()


@dataclass
class Collected:
    """Latent and true activations of a set of tokens, gathered once and shared by metrics."""

    x: torch.Tensor  # [T, d_in]
    latents: torch.Tensor  # [T, d_sae]
    features: torch.Tensor  # [T, n_features]
    x_hat: torch.Tensor  # [T, d_in]


@torch.no_grad()
def collect(sae: SAE, batches: Iterable) -> Collected:
    """Run the SAE (eval mode) over batches that carry true feature activations."""
    was = sae.training
    sae.eval()
    xs, fs, feats, xh = [], [], [], []
    try:
        for b in batches:
            if not isinstance(b, Batch) or b.features is None:
                raise ConfigError("pathology metrics need Batches with true `features`; sample them from a toy world")
            x = b.x.float().to(sae.W_enc.device)
            f = sae.encode(x)
            (
                xs.append(x.cpu()),
                fs.append(f.cpu()),
                feats.append(b.features.float().cpu()),
                xh.append(sae.decode(f, tokens=b.tokens).cpu()),
            )
    finally:
        sae.train(was)
    if not xs:
        raise ConfigError("no batches to evaluate on; give at least one batch")
    return Collected(torch.cat(xs), torch.cat(fs), torch.cat(feats), torch.cat(xh))


def _data(sae: SAE, data: Collected | Iterable) -> Collected:
    return data if isinstance(data, Collected) else collect(sae, data)


def _contribution(sae: SAE, latents: torch.Tensor, idx: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[T, len(idx)]: how much of each true direction latent idx[j] writes: f * (d_latent . u_feature)."""
    dec = sae.W_dec.detach().float().cpu()[idx]  # [K, d_in]
    return latents[:, idx] * (dec * directions).sum(-1)


# ---------------------------------------------------------------------------- shrinkage
@dataclass
class ShrinkageMetrics:
    gamma: float  # relative reconstruction bias E||x_hat||^2 / E[x_hat . x]; < 1 means shrinkage
    norm_ratio: float  # E||x_hat|| / E||x||
    feature_magnitude_ratio: (
        float  # median over matched features of sum(latent's write along u_i) / sum(a_i), where a_i > 0
    )

    def as_dict(self) -> dict:
        return asdict(self)


def shrinkage(sae: SAE, data: Collected | Iterable, directions: torch.Tensor | None = None) -> ShrinkageMetrics:
    """Shrinkage as gamma* (Wright & Sharkey) and, with ground truth, per matched feature."""
    c = _data(sae, data)
    x, xh = c.x, c.x_hat
    gamma = float(xh.pow(2).sum() / (xh * x).sum()) if float((xh * x).sum()) != 0 else float("nan")
    ratio = float("nan")
    if directions is not None:
        u = _check_dirs(sae, directions)
        match = match_latents(decoder_cosines(sae, directions))
        ok = match >= 0
        contrib = _contribution(sae, c.latents, match[ok], u[ok])
        a = c.features[:, ok]
        on = a > 0
        num, den = (contrib * on).sum(0), (a * on).sum(0)
        valid = den > 0
        ratio = float((num[valid] / den[valid]).median()) if valid.any() else float("nan")
    return ShrinkageMetrics(
        gamma=gamma,
        norm_ratio=float(xh.norm(dim=1).mean() / x.norm(dim=1).mean().clamp_min(1e-30)),
        feature_magnitude_ratio=ratio,
    )


# ---------------------------------------------------------------------------- recovery and MCC
@dataclass
class MatchedRecovery:
    recovered_fraction: float  # features matched one-to-one to a latent with decoder cosine >= threshold
    mean_matched_cosine: float
    mcc: float  # mean correlation of activations after a one-to-one match on |Pearson r| (nan without features)
    threshold: float
    matched_latents: list[int] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def activation_correlations(latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[n_features, d_sae] Pearson correlations (0 where a column is constant)."""
    a = features.double() - features.double().mean(0)
    f = latents.double() - latents.double().mean(0)
    cov = a.t() @ f
    norm = a.norm(dim=0)[:, None] * f.norm(dim=0)[None, :]
    return torch.where(norm > 0, cov / norm.clamp_min(1e-300), torch.zeros_like(cov)).float()


def matched_recovery(
    sae: SAE, directions: torch.Tensor, data: Collected | Iterable | None = None, threshold: float = 0.9
) -> MatchedRecovery:
    """Hungarian matching on decoder cosines, plus the mean correlation coefficient (MCC) of the
    ICA literature: Hungarian matching on |corr(true activation, latent activation)|."""
    cos = decoder_cosines(sae, directions)
    match = match_latents(cos)
    matched = torch.tensor([float(cos[i, j]) if j >= 0 else -1.0 for i, j in enumerate(match.tolist())])
    mcc = float("nan")
    if data is not None:
        c = _data(sae, data)
        corr = activation_correlations(c.latents, c.features).abs()
        m2 = match_latents(corr)
        mcc = float(torch.tensor([float(corr[i, j]) if j >= 0 else 0.0 for i, j in enumerate(m2.tolist())]).mean())
    return MatchedRecovery(
        float((matched >= threshold).float().mean()),
        float(matched.clamp_min(-1).mean()),
        mcc,
        threshold,
        match.tolist(),
    )


# ---------------------------------------------------------------------------- absorption and hedging
@dataclass
class AbsorptionMetrics:
    """For parent/child pairs (child fires only when its parent fires)."""

    absorption_rate: float  # mean over pairs: P(parent latent silent | child fires)
    parent_alone_miss_rate: float  # baseline: P(parent latent silent | parent fires without that child)
    child_decoder_parent_cos: float  # mean cos(child latent's decoder, parent direction)
    child_encoder_parent_cos: float  # mean cos(child latent's encoder, parent direction): asymmetry shows absorption
    absorbed_fraction: float  # mean share of the parent's magnitude written by the child latent when both fire
    pairs: int
    per_pair_rate: list[float] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def absorption(
    sae: SAE,
    data: Collected | Iterable,
    directions: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    fire_fraction: float = 0.1,
    min_tokens: int = 5,
) -> AbsorptionMetrics:
    """Chanin et al.'s toy absorption: does the parent's latent stay silent when the child fires,
    and does the child's latent carry the parent direction instead?"""
    if not pairs:
        raise ConfigError("absorption needs (parent, child) pairs; this world has no hierarchy")
    c = _data(sae, data)
    u = _check_dirs(sae, directions)
    match = match_latents(decoder_cosines(sae, directions))
    enc = unit_rows(sae.W_enc.detach().float().cpu().t())
    dec = unit_rows(sae.W_dec.detach().float().cpu())
    rates, alone, dcos, ecos, frac = [], [], [], [], []
    for p, ch in pairs:
        lp, lc = int(match[p]), int(match[ch])
        if lp < 0 or lc < 0:
            continue
        a_p, a_c = c.features[:, p], c.features[:, ch]
        child_on = (a_c > 0) & (a_p > 0)
        alone_on = (a_p > 0) & (a_c == 0)
        if int(child_on.sum()) < min_tokens:
            continue
        contrib_p = _contribution(sae, c.latents, torch.tensor([lp]), u[p : p + 1])[:, 0]
        contrib_c = _contribution(sae, c.latents, torch.tensor([lc]), u[p : p + 1])[:, 0]
        silent = contrib_p < fire_fraction * a_p
        rates.append(float(silent[child_on].float().mean()))
        if int(alone_on.sum()) >= min_tokens:
            alone.append(float(silent[alone_on].float().mean()))
        dcos.append(float(dec[lc] @ u[p]))
        ecos.append(float(enc[lc] @ u[p]))
        frac.append(float(contrib_c[child_on].sum() / a_p[child_on].sum().clamp_min(1e-12)))
    nan = float("nan")
    mean = lambda v: float(np.mean(v)) if v else nan  # noqa: E731
    return AbsorptionMetrics(mean(rates), mean(alone), mean(dcos), mean(ecos), mean(frac), len(rates), rates)


@dataclass
class HedgingMetrics:
    hedging: float  # mean over pairs of cos(parent latent's decoder, child direction) - cos(parent, child)
    max_hedging: float
    pairs: int

    def as_dict(self) -> dict:
        return asdict(self)


def hedging(sae: SAE, directions: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> HedgingMetrics:
    """How much of a child direction leaks into its parent's latent (Chanin et al. 2025), beyond the
    overlap the true directions already have. MSE-driven, so strongest in narrow dictionaries."""
    if not pairs:
        raise ConfigError("hedging needs (parent, child) pairs; this world has no hierarchy")
    u = _check_dirs(sae, directions)
    cos = decoder_cosines(sae, directions)
    match = match_latents(cos)
    vals = []
    for p, ch in pairs:
        if match[p] >= 0:
            vals.append(float(cos[ch, match[p]] - u[ch] @ u[p]))
    return HedgingMetrics(
        float(np.mean(vals)) if vals else float("nan"), float(np.max(vals)) if vals else float("nan"), len(vals)
    )


# ---------------------------------------------------------------------------- splitting and merging
@dataclass
class SplittingMetrics:
    split_fraction: float  # true features with >= 2 live latents at decoder cosine >= threshold
    latents_per_feature: float  # mean count of such latents over features that have at least one
    threshold: float

    def as_dict(self) -> dict:
        return asdict(self)


def splitting(
    sae: SAE, directions: torch.Tensor, data: Collected | Iterable | None = None, threshold: float = 0.7
) -> SplittingMetrics:
    """One true feature spread over several latents that all point along it (dead latents,
    known from `data`, are ignored)."""
    cos = decoder_cosines(sae, directions)
    if data is not None:
        alive = (_data(sae, data).latents != 0).any(0)
        cos = cos[:, alive]
    counts = (cos >= threshold).sum(1).float()
    has = counts > 0
    return SplittingMetrics(
        float((counts >= 2).float().mean()), float(counts[has].mean()) if has.any() else 0.0, threshold
    )


@dataclass
class MergingMetrics:
    merged_latent_fraction: float  # live latents whose decoder also carries a second true feature
    merged_feature_fraction: float  # true features involved in such a merge
    threshold: float

    def as_dict(self) -> dict:
        return asdict(self)


def merging(
    sae: SAE, data: Collected | Iterable | None, directions: torch.Tensor, threshold: float = 0.3
) -> MergingMetrics:
    """Several true features captured by one latent ("sparse but wrong"). Each latent belongs to
    its best-matching feature m; it has merged feature i if cos(d_latent, u_i) exceeds the
    overlap the truth already has, |cos(u_m, u_i)|, by at least `threshold`, so superposition
    in the world itself does not count as a merge. Dead latents (known from `data`) are ignored."""
    u = _check_dirs(sae, directions)
    cos = decoder_cosines(sae, directions)  # [N, M]
    main = cos.argmax(0)  # [M]
    truth = (u @ u.t()).abs()  # [N, N]
    excess = cos.t() - truth[main]  # [M, N]
    excess[torch.arange(len(main)), main] = float("-inf")
    merged = excess >= threshold  # [M, N]
    alive = torch.ones(len(main), dtype=torch.bool)
    if data is not None:
        alive = (_data(sae, data).latents != 0).any(0)
    merged &= alive[:, None]
    merged_latents = merged.any(1)
    features = merged.any(0)
    features[main[merged_latents]] = True
    return MergingMetrics(
        float(merged_latents.sum()) / max(int(alive.sum()), 1), float(features.float().mean()), threshold
    )


# ---------------------------------------------------------------------------- choosing L0
@dataclass
class NthDecoderProjection:
    value: float  # mean over batches of the (n * batch_size)-th largest (x - b_dec) . d_j
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def nth_decoder_projection(sae: SAE, batches: Iterable, n: int | None = None) -> NthDecoderProjection:
    """Chanin & Garriga-Alonso's proxy for the right L0 ("Sparse but Wrong", arXiv 2508.16560):
    sort every (x - b_dec) . d_j (unit decoder rows) in a batch and take the value at index
    n * batch_size. Mixed latents (L0 too low) pick up projections from correlated features,
    which raises it; too high an L0 raises it again, so it is lowest near the true L0. Default
    n = d_sae // 8: on the bench's correlated world (true L0 5, d_sae 64) d_sae // 2 sat among the
    negative projections and showed nothing, and d_sae // 4 gave a weaker low-L0 side."""
    n = max(1, sae.cfg.d_sae // 8) if n is None else n
    if not 1 <= n <= sae.cfg.d_sae:
        raise ConfigError(f"n={n} must lie in [1, d_sae={sae.cfg.d_sae}]")
    dec = unit_rows(sae.W_dec.detach().float())
    vals = []
    for b in batches:
        x = (b.x if isinstance(b, Batch) else torch.as_tensor(b)).float().to(dec.device)
        centred = x - sae.b_dec.detach() if sae.cfg.apply_b_dec_to_input else x  # as encode() sees it
        proj = (centred @ dec.t()).flatten()
        idx = n * x.shape[0]
        vals.append(float(proj.topk(idx).values[-1]))
    if not vals:
        raise ConfigError("no batches to evaluate on; give at least one batch")
    return NthDecoderProjection(float(np.mean(vals)), n)


# ---------------------------------------------------------------------------- the elephant world
@dataclass
class BundleMetrics:
    """Does the SAE learn 'elephant' or 'grey + big + mammal'? (max decoder cosine >= threshold)."""

    entity_recovered: float  # entities with a latent along their own (bundle + label) direction
    attribute_recovered: float  # attributes with a latent of their own
    label_recovered: float  # entity labels with a latent of their own (nan without labels)
    threshold: float

    def as_dict(self) -> dict:
        return asdict(self)


def bundle_decomposition(sae: SAE, world, threshold: float = 0.9) -> BundleMetrics:
    if getattr(world, "bundles", None) is None:
        raise ConfigError("bundle_decomposition needs a bundle world (kind='bundle')")
    n_e = len(world.bundles)
    dec = unit_rows(sae.W_dec.detach().float().cpu())
    best = lambda dirs: (unit_rows(dirs.float()) @ dec.t()).max(1).values  # noqa: E731
    ent = float((best(world.directions[:n_e]) >= threshold).float().mean())
    att = float((best(world.attribute_directions) >= threshold).float().mean())
    lab = (
        float((best(world.label_directions) >= threshold).float().mean())
        if world.label_directions is not None
        else float("nan")
    )
    return BundleMetrics(ent, att, lab, threshold)
