"""SAE pathologies measured against a toy world's ground truth.

Each metric is a plain function returning a dataclass. Latents are matched to true features
one-to-one by the Hungarian algorithm on decoder cosines (`saelab.evals.core.match_features`), so
one latent cannot stand for two features; pass that `Matching` in place of the directions to
share it between metrics, and a `Collected` in place of batches to share one encoding pass. Where a metric asks whether a latent "carries" a feature on a token, it compares what
the latent writes along the true direction, f * (d_latent . u), with the feature's true
magnitude, so tiny leaky activations of L1 SAEs do not count as firing. In a hierarchy, latents
are also compared with parent + child composites, the direction a child latent decodes once it has
absorbed its parent (`composite_recovery`, `absorbing_latents`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.evals.core import Matching, _batches, encoded, eval_mode, match_features, match_latents, unit_rows
from saelab.sae.base import SAE


# ---------------------------------------------------------------------------- shared pieces
@dataclass
class Collected:
    """Latent and true activations of a set of tokens, gathered once and shared by metrics."""

    x: torch.Tensor  # [T, d_in]
    latents: torch.Tensor  # [T, d_sae]
    features: torch.Tensor  # [T, n_features]
    x_hat: torch.Tensor  # [T, d_in]

    @classmethod
    def gather(cls, steps: Iterable[tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]]) -> Collected:
        """From the (batch, x, latents, reconstruction) steps of `saelab.evals.core.encoded`."""
        xs, fs, feats, xh = [], [], [], []
        for b, x, f, x_hat in steps:
            if b.features is None:
                raise ConfigError("pathology metrics need Batches with true `features`; sample them from a toy world")
            xs.append(x.cpu())
            fs.append(f.cpu())
            feats.append(b.features.float().cpu())
            xh.append(x_hat.cpu())
        if not xs:
            raise ConfigError("no batches to evaluate on; give at least one batch")
        return cls(torch.cat(xs), torch.cat(fs), torch.cat(feats), torch.cat(xh))

    @property
    def alive(self) -> torch.Tensor:
        """[d_sae] latents that fired on at least one of the tokens."""
        return (self.latents != 0).any(0)


def collect(sae: SAE, batches: Iterable) -> Collected:
    """Run the SAE (eval mode) over batches that carry true feature activations."""
    with eval_mode(sae):
        return Collected.gather(encoded(sae, batches))


def _data(sae: SAE, data: Collected | Iterable) -> Collected:
    return data if isinstance(data, Collected) else collect(sae, data)


def _contribution(sae: SAE, latents: torch.Tensor, idx: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[T, len(idx)]: how much of each true direction latent idx[j] writes: f * (d_latent . u_feature)."""
    dec = sae.W_dec.detach().float().cpu()[idx]  # [K, d_in]
    return latents[:, idx] * (dec * directions).sum(-1)


# ---------------------------------------------------------------------------- shrinkage and MCC
@dataclass
class FeatureShrinkage:
    """Shrinkage per true feature; the reconstruction-level gamma* is `ReconstructionMetrics.shrinkage`."""

    feature_magnitude_ratio: float  # median over matched features of sum(latent's write along u_i) / sum(a_i), a_i > 0

    def as_dict(self) -> dict:
        return asdict(self)


def feature_shrinkage(sae: SAE, data: Collected | Iterable, directions: torch.Tensor | Matching) -> FeatureShrinkage:
    """How much of each true feature's magnitude its matched latent writes back along its direction."""
    c = _data(sae, data)
    m = match_features(sae, directions)
    ok = m.latents >= 0
    contrib = _contribution(sae, c.latents, m.latents[ok], m.directions[ok])
    a = c.features[:, ok]
    on = a > 0
    num, den = (contrib * on).sum(0), (a * on).sum(0)
    valid = den > 0
    return FeatureShrinkage(float((num[valid] / den[valid]).median()) if valid.any() else float("nan"))


@dataclass
class CorrelationMetrics:
    mcc: float  # mean correlation of activations after a one-to-one match on |Pearson r|
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


def mean_correlation(sae: SAE, data: Collected | Iterable) -> CorrelationMetrics:
    """The mean correlation coefficient (MCC) of the ICA literature: Hungarian matching on
    |corr(true activation, latent activation)|, a matching of activations rather than directions."""
    c = _data(sae, data)
    corr = activation_correlations(c.latents, c.features).abs()
    match = match_latents(corr)
    mcc = float(torch.tensor([float(corr[i, j]) if j >= 0 else 0.0 for i, j in enumerate(match.tolist())]).mean())
    return CorrelationMetrics(mcc, match.tolist())


# ---------------------------------------------------------------------------- composites and absorption
def composite_directions(
    directions: torch.Tensor | Matching, pairs: Sequence[tuple[int, int]], weights: torch.Tensor | None = None
) -> torch.Tensor:
    """[P, d] unit parent + child directions, one per (parent, child): what a child latent that
    absorbed its parent decodes. `weights` [P, 2] scales (parent, child) first (`coactive_magnitudes`)."""
    u = directions.directions if isinstance(directions, Matching) else unit_rows(directions.detach().float().cpu())
    idx = torch.tensor([list(pc) for pc in pairs], dtype=torch.long).reshape(-1, 2)
    w = torch.ones(len(idx), 2) if weights is None else weights
    return unit_rows(w[:, :1] * u[idx[:, 0]] + w[:, 1:] * u[idx[:, 1]])


def coactive_magnitudes(data: Collected, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[P, 2] mean (parent, child) magnitudes on the tokens where both fire (1 where none do), so the
    composite follows the world's own magnitudes when it scales parents and children differently."""
    out = torch.ones(len(pairs), 2)
    for k, (p, ch) in enumerate(pairs):
        both = (data.features[:, p] > 0) & (data.features[:, ch] > 0)
        if both.any():
            out[k] = data.features[both][:, [p, ch]].mean(0)
    return out


@dataclass
class CompositeRecovery:
    """Does the dictionary hold parent + child composites instead of the features themselves?"""

    composites_recovered: float  # composites matched one-to-one (Hungarian) to a latent at cos >= threshold
    composites_recovered_weighted: float  # the same at the data's co-active magnitudes (nan without data)
    mean_matched_cosine: float  # mean over composites of their match's cosine
    threshold: float
    pairs: int

    def as_dict(self) -> dict:
        return asdict(self)


def composite_recovery(
    sae: SAE,
    directions: torch.Tensor | Matching,
    pairs: Sequence[tuple[int, int]],
    data: Collected | Iterable | None = None,
    threshold: float = 0.9,
) -> CompositeRecovery:
    """The fraction of parent + child composites a latent points along, matched one-to-one as
    `recovered_fraction` matches features, so one latent never counts for two composites. (With
    near-orthogonal features, best-match gives the same count at 0.9: one latent can be within 0.9
    of two composites only if they are at cos > 0.62, and siblings' composites are at 0.5.)"""
    if not pairs:
        raise ConfigError("composite_recovery needs (parent, child) pairs; this world has no hierarchy")
    m = match_features(sae, directions)
    dec = unit_rows(sae.W_dec.detach().float().cpu())

    def recovered(comp: torch.Tensor) -> tuple[float, float]:
        cos = comp @ dec.t()
        match = match_latents(cos)
        got = torch.tensor([float(cos[k, j]) if j >= 0 else -1.0 for k, j in enumerate(match.tolist())])
        return float((got >= threshold).float().mean()), float(got.mean())

    frac, mean_cos = recovered(composite_directions(m, pairs))
    weighted = float("nan")
    if data is not None:
        weighted = recovered(composite_directions(m, pairs, coactive_magnitudes(_data(sae, data), pairs)))[0]
    return CompositeRecovery(frac, weighted, mean_cos, threshold, len(pairs))


def absorbing_latents(
    sae: SAE, directions: torch.Tensor | Matching, pairs: Sequence[tuple[int, int]], threshold: float = 0.9
) -> torch.Tensor:
    """[d_sae] the pair index of each absorbing latent (-1 for the rest). A latent absorbs pair
    (p, c) when its decoder is closer to that composite than to any true feature or other composite,
    at cos >= threshold, and its encoder reads the child more than the parent: Chanin et al.'s
    asymmetry, which tells an absorbing child latent from a parent latent hedged towards its child
    (their decoders can look alike). A transcoder's encoder reads another space, so there only the
    decoder decides."""
    if not pairs:
        raise ConfigError("absorbing_latents needs (parent, child) pairs; this world has no hierarchy")
    m = match_features(sae, directions)
    dec = unit_rows(sae.W_dec.detach().float().cpu())
    comp_cos = composite_directions(m, pairs) @ dec.t()  # [P, M]
    best_comp, k = comp_cos.max(0)
    best_feature = m.cosines.max(0).values
    absorbs = (best_comp >= threshold) & (best_comp > best_feature)
    if not sae.cfg.is_transcoder:
        enc = unit_rows(sae.W_enc.detach().float().cpu().t())  # [M, d]
        idx = torch.tensor([list(pc) for pc in pairs], dtype=torch.long)[k]  # [M, 2] each latent's pair
        u = m.directions
        absorbs &= (enc * u[idx[:, 1]]).sum(-1) > (enc * u[idx[:, 0]]).sum(-1)
    return torch.where(absorbs, k, torch.full_like(k, -1))


@dataclass
class AbsorptionMetrics:
    """For parent/child pairs (child fires only when its parent fires). A latent that absorbs a pair
    (`absorbing_latents`) is never taken for the parent's own latent: it is the child's."""

    absorption_rate: float  # mean over pairs: P(parent's own latent silent | child fires)
    parent_alone_miss_rate: float  # baseline: P(parent's own latent silent | parent fires without that child)
    child_decoder_parent_cos: float  # mean cos(child latent's decoder, parent direction)
    child_encoder_parent_cos: float  # mean cos(child latent's encoder, parent direction): asymmetry shows absorption
    absorbed_fraction: float  # mean share of the parent's magnitude written by the child latent when both fire
    pairs: int
    absorbing_latent_fraction: float = 0.0  # live latents that absorb a pair, over live latents
    absorbed_pair_fraction: float = 0.0  # pairs with a live absorbing latent
    absorbed_parent_fraction: float = 0.0  # parents only in absorbing latents (none of their own at threshold)
    per_pair_rate: list[float] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def absorption(
    sae: SAE,
    data: Collected | Iterable,
    directions: torch.Tensor | Matching,
    pairs: Sequence[tuple[int, int]],
    fire_fraction: float = 0.1,
    min_tokens: int = 5,
    threshold: float = 0.9,
) -> AbsorptionMetrics:
    """Chanin et al.'s toy absorption: does the parent's latent stay silent when the child fires,
    and does the child's latent carry the parent direction instead?

    The one-to-one match can hand a parent a latent that is really a parent + child composite, which
    is silent on the other children's tokens and on the parent alone, so it would read as a parent
    latent that misses; instead a parent whose match absorbs a pair has no latent of its own (silent
    everywhere), and a child's latent is the pair's absorbing latent when there is one."""
    if not pairs:
        raise ConfigError("absorption needs (parent, child) pairs; this world has no hierarchy")
    c = _data(sae, data)
    m = match_features(sae, directions)
    u, match = m.directions, m.latents
    enc = unit_rows(sae.W_enc.detach().float().cpu().t())
    dec = unit_rows(sae.W_dec.detach().float().cpu())
    alive = c.alive
    absorber = absorbing_latents(sae, m, pairs, threshold)
    absorber[~alive] = -1
    comp_cos = composite_directions(m, pairs) @ dec.t()  # [P, M]
    rates, alone, dcos, ecos, frac = [], [], [], [], []
    for k, (p, ch) in enumerate(pairs):
        lp = int(match[p]) if match[p] >= 0 and absorber[match[p]] < 0 else -1
        mine = (absorber == k).nonzero().flatten()
        lc = int(mine[comp_cos[k, mine].argmax()]) if len(mine) else int(match[ch])
        a_p, a_c = c.features[:, p], c.features[:, ch]
        child_on = (a_c > 0) & (a_p > 0)
        alone_on = (a_p > 0) & (a_c == 0)
        if int(child_on.sum()) < min_tokens:
            continue
        contrib_p = (
            _contribution(sae, c.latents, torch.tensor([lp]), u[p : p + 1])[:, 0] if lp >= 0 else torch.zeros_like(a_p)
        )
        silent = contrib_p < fire_fraction * a_p
        rates.append(float(silent[child_on].float().mean()))
        if int(alone_on.sum()) >= min_tokens:
            alone.append(float(silent[alone_on].float().mean()))
        if lc >= 0:
            contrib_c = _contribution(sae, c.latents, torch.tensor([lc]), u[p : p + 1])[:, 0]
            dcos.append(float(dec[lc] @ u[p]))
            ecos.append(float(enc[lc] @ u[p]))
            frac.append(float(contrib_c[child_on].sum() / a_p[child_on].sum().clamp_min(1e-12)))
    parents = sorted({p for p, _ in pairs})
    own = (m.cosines >= threshold) & (absorber < 0)[None, :] & alive[None, :]  # [N, M] a latent of its own
    pair_parent = torch.tensor([p for p, _ in pairs])
    absorbed_pairs = torch.tensor([bool((absorber == k).any()) for k in range(len(pairs))])
    lives_in_composites = [bool(absorbed_pairs[pair_parent == p].any()) and not bool(own[p].any()) for p in parents]
    nan = float("nan")
    mean = lambda v: float(np.mean(v)) if v else nan  # noqa: E731
    return AbsorptionMetrics(
        mean(rates),
        mean(alone),
        mean(dcos),
        mean(ecos),
        mean(frac),
        len(rates),
        float((absorber >= 0).sum()) / max(int(alive.sum()), 1),
        float(absorbed_pairs.float().mean()),
        mean(lives_in_composites),
        rates,
    )


@dataclass
class HedgingMetrics:
    hedging: float  # mean over pairs of cos(parent latent's decoder, child direction) - cos(parent, child)
    max_hedging: float
    pairs: int

    def as_dict(self) -> dict:
        return asdict(self)


def hedging(
    sae: SAE, directions: torch.Tensor | Matching, pairs: Sequence[tuple[int, int]], threshold: float = 0.9
) -> HedgingMetrics:
    """How much of a child direction leaks into its parent's latent (Chanin et al. 2025), beyond the
    overlap the true directions already have. MSE-driven, so strongest in narrow dictionaries. A
    parent matched to a latent that absorbs a pair (`absorbing_latents`) has no latent to hedge."""
    if not pairs:
        raise ConfigError("hedging needs (parent, child) pairs; this world has no hierarchy")
    m = match_features(sae, directions)
    u, cos, match = m.directions, m.cosines, m.latents
    absorber = absorbing_latents(sae, m, pairs, threshold)
    vals = []
    for p, ch in pairs:
        if match[p] >= 0 and absorber[match[p]] < 0:
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
    sae: SAE, directions: torch.Tensor | Matching, data: Collected | Iterable | None = None, threshold: float = 0.7
) -> SplittingMetrics:
    """One true feature spread over several latents that all point along it (dead latents,
    known from `data`, are ignored)."""
    cos = match_features(sae, directions).cosines
    if data is not None:
        cos = cos[:, _data(sae, data).alive]
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
    sae: SAE, data: Collected | Iterable | None, directions: torch.Tensor | Matching, threshold: float = 0.3
) -> MergingMetrics:
    """Several true features captured by one latent ("sparse but wrong"). Each latent belongs to
    its best-matching feature m; it has merged feature i if cos(d_latent, u_i) exceeds the
    overlap the truth already has, |cos(u_m, u_i)|, by at least `threshold`, so superposition
    in the world itself does not count as a merge. Dead latents (known from `data`) are ignored."""
    m = match_features(sae, directions)
    u, cos = m.directions, m.cosines  # cos: [N, M]
    main = cos.argmax(0)  # [M]
    truth = (u @ u.t()).abs()  # [N, N]
    excess = cos.t() - truth[main]  # [M, N]
    excess[torch.arange(len(main)), main] = float("-inf")
    merged = excess >= threshold  # [M, N]
    alive = torch.ones(len(main), dtype=torch.bool) if data is None else _data(sae, data).alive
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


def nth_decoder_projection(sae: SAE, batches: Iterable, n: int | None = None) -> NthDecoderProjection:
    """Chanin & Garriga-Alonso's proxy for the right L0 ("Sparse but Wrong", arXiv 2508.16560):
    sort every (x - b_dec) . d_j (unit decoder rows) in a batch and take the value at index
    n * batch_size. Mixed latents (L0 too low) pick up projections from correlated features,
    which raises it; too high an L0 raises it again, so it is lowest near the true L0. Default
    n = d_sae // 8: on the bench's correlated world (true L0 5, d_sae 64) d_sae // 2 sat among the
    negative projections and showed nothing, and d_sae // 4 gave a weaker low-L0 side."""
    n = nth_projection_index(sae, n)
    return mean_projection([decoder_projection_at(sae, b.x.float(), n) for b in _batches(batches)], n)


def nth_projection_index(sae: SAE, n: int | None = None) -> int:
    """`n` of `nth_decoder_projection`, checked (default d_sae // 8)."""
    n = max(1, sae.cfg.d_sae // 8) if n is None else n
    if not 1 <= n <= sae.cfg.d_sae:
        raise ConfigError(f"n={n} must lie in [1, d_sae={sae.cfg.d_sae}]")
    return n


def mean_projection(per_batch: list[float], n: int) -> NthDecoderProjection:
    """The metric from each batch's `decoder_projection_at` value."""
    if not per_batch:
        raise ConfigError("no batches to evaluate on; give at least one batch")
    return NthDecoderProjection(float(np.mean(per_batch)), n)


@torch.no_grad()
def decoder_projection_at(sae: SAE, x: torch.Tensor, n: int) -> float:
    """One batch's (n * batch_size)-th largest (x - b_dec) . d_j, as `encode` sees x (for a
    transcoder, pass its target: the space its decoder writes)."""
    dec = unit_rows(sae.W_dec.detach().float())
    x = x.to(dec.device)
    centred = x - sae.b_dec.detach() if sae.cfg.apply_b_dec_to_input or sae.cfg.is_transcoder else x
    return float((centred @ dec.t()).flatten().topk(n * x.shape[0]).values[-1])


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
