"""Metrics as plain functions returning dataclasses; reports and the CLI only format them.

Every function takes an SAE and an iterable of batches (or `Batch`es) and runs the SAE in eval
mode without gradients (`eval_mode`, `encoded`), accumulating sums so any number of batches can
be used. Metrics against known directions share one `Matching` of latents to true features.
`saelab.evals.summary.evaluate` runs all of them in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.sae.base import SAE


def _batches(batches: Iterable) -> Iterable[Batch]:
    for b in batches:
        yield b if isinstance(b, Batch) else Batch(x=torch.as_tensor(b))


@contextmanager
def eval_mode(sae: SAE) -> Iterator[SAE]:
    """The SAE in eval mode and without gradients for the block; its training flag comes back after."""
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad():
            yield sae
    finally:
        sae.train(was_training)


def encoded(sae: SAE, batches: Iterable) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(batch, x, latents, output) for each batch as the dictionary sees it (`Batch.view` of the
    sites it reads and writes), x and `batch.target` (what the output is measured against) as
    float32 on the SAE's device; a skip transcoder's output includes its skip.

    The one encoding loop of every metric; run it inside `eval_mode`.
    """
    cfg, device = sae.cfg, sae.W_enc.device
    for batch in _batches(batches):
        # as the trainer sees it: without sites an SAE reproduces the batch's own x, even when the
        # source pairs it with a distinct target (a transcoder world, a model source's target_hookpoint)
        batch = batch.view(cfg.read_sites, cfg.write_sites if cfg.is_transcoder else None)
        same = batch.target is batch.x
        x = batch.x.to(device, torch.float32)
        batch = Batch(
            x=x,
            features=batch.features,
            tokens=batch.tokens,
            target=x if same else batch.target.to(device, torch.float32),
            sites=batch.sites,
        )
        f = sae.encode(x)
        out = sae.decode(f, tokens=batch.tokens)
        yield batch, x, f, (out + sae.skip_out(x) if cfg.skip else out)


@dataclass
class ReconstructionMetrics:
    l0: float  # mean number of non-zero latents per token
    mse: float  # mean over tokens of ||x - x_hat||^2
    fvu: float  # fraction of variance unexplained, ||x - x_hat||^2 / ||x - mean(x)||^2
    explained_variance: float  # 1 - fvu
    cosine_similarity: float  # mean cos(x, x_hat) over tokens with x != 0
    shrinkage: float  # relative reconstruction bias gamma* = E||x_hat||^2 / E[x_hat . x]; < 1 means shrinkage
    norm_ratio: float  # E||x_hat|| / E||x||, a cheaper shrinkage proxy
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


class ReconstructionSums:
    """Running sums behind `ReconstructionMetrics` and per-latent firing counts, batch by batch,
    so any number of batches streams through without being kept."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sums = dict(sq_err=0.0, cos=0.0, cos_n=0.0, xhat_sq=0.0, xhat_dot_x=0.0, xhat_norm=0.0, x_norm=0.0)
        self.x_sum: torch.Tensor | None = None
        self.x_sq_sum: torch.Tensor | None = None
        self.fired = torch.zeros(d_sae, dtype=torch.float64)  # tokens each latent fired on

    def add(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        """One batch: `x` is what `x_hat` should reproduce (a transcoder's target), `f` the latents."""
        sums = self.sums
        self.n += x.shape[0]
        self.fired += (f != 0).sum(0).double().cpu()
        sums["sq_err"] += float((x - x_hat).pow(2).sum())
        nonzero = x.norm(dim=-1) > 0
        sums["cos"] += float(torch.nn.functional.cosine_similarity(x[nonzero], x_hat[nonzero], dim=-1).sum())
        sums["cos_n"] += float(nonzero.sum())
        sums["xhat_sq"] += float(x_hat.pow(2).sum())
        sums["xhat_dot_x"] += float((x_hat * x).sum())
        sums["xhat_norm"] += float(x_hat.norm(dim=-1).sum())
        sums["x_norm"] += float(x.norm(dim=-1).sum())
        xs = x.double()
        self.x_sum = xs.sum(0) if self.x_sum is None else self.x_sum + xs.sum(0)
        self.x_sq_sum = xs.pow(2).sum(0) if self.x_sq_sum is None else self.x_sq_sum + xs.pow(2).sum(0)

    def metrics(self) -> ReconstructionMetrics:
        n, sums = self.n, self.sums
        if n == 0:
            raise ConfigError("no batches to evaluate on; give at least one batch")
        total_var = float((self.x_sq_sum - self.x_sum.pow(2) / n).sum())
        fvu = sums["sq_err"] / max(total_var, 1e-30)
        return ReconstructionMetrics(
            l0=float(self.fired.sum()) / n,
            mse=sums["sq_err"] / n,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            cosine_similarity=sums["cos"] / max(sums["cos_n"], 1.0),
            shrinkage=sums["xhat_sq"] / sums["xhat_dot_x"] if sums["xhat_dot_x"] != 0 else float("nan"),
            norm_ratio=sums["xhat_norm"] / max(sums["x_norm"], 1e-30),
            tokens=n,
        )


def reconstruction_metrics(sae: SAE, batches: Iterable) -> ReconstructionMetrics:
    return reconstruction_and_firing(sae, batches)[0]


def reconstruction_and_firing(sae: SAE, batches: Iterable) -> tuple[ReconstructionMetrics, torch.Tensor]:
    """Reconstruction metrics and, from the same encoding pass, how many tokens each latent
    fired on ([d_sae], for `density_from_counts`)."""
    sums = ReconstructionSums(sae.cfg.d_sae)
    with eval_mode(sae):
        for batch, _, f, x_hat in encoded(sae, batches):
            sums.add(batch.target, f, x_hat)
    return sums.metrics(), sums.fired


@dataclass
class DensityMetrics:
    dead_fraction: float  # latents that never fired on the evaluation tokens
    dense_fraction: float  # latents firing on more than `dense_threshold` of tokens
    dense_threshold: float
    histogram_edges: list[float]  # log10 firing-frequency bin edges
    histogram_counts: list[int]  # latents per bin (dead latents excluded)
    frequencies: list[float] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def latent_density(sae: SAE, batches: Iterable, dense_threshold: float = 0.1, bins: int = 20) -> DensityMetrics:
    metrics, fired = reconstruction_and_firing(sae, batches)
    return density_from_counts(fired, metrics.tokens, dense_threshold, bins)


def density_from_counts(counts: torch.Tensor, n: int, dense_threshold: float = 0.1, bins: int = 20) -> DensityMetrics:
    """Density metrics from per-latent firing counts over `n` tokens."""
    if n == 0:
        raise ConfigError("no batches to evaluate on; give at least one batch")
    freq = counts.double() / n
    alive = freq[freq > 0]
    low = np.floor(np.log10(max(1.0 / n, 1e-12)))
    edges = np.linspace(low, 0.0, bins + 1)
    hist, _ = np.histogram(np.log10(alive.numpy()), bins=edges) if alive.numel() else (np.zeros(bins, int), edges)
    return DensityMetrics(
        dead_fraction=float((freq == 0).double().mean()),
        dense_fraction=float((freq > dense_threshold).double().mean()),
        dense_threshold=dense_threshold,
        histogram_edges=edges.tolist(),
        histogram_counts=[int(c) for c in hist],
        frequencies=freq.tolist(),
    )


# ---------------------------------------------------------------------------- ground truth
def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def match_latents(cos: torch.Tensor) -> torch.Tensor:
    """One-to-one assignment (Hungarian, maximising `cos`): the latent of each row, -1 if none left.

    One-to-one, so one latent cannot claim two features and duplicated latents do not inflate recovery.
    """
    rows, cols = linear_sum_assignment(-cos.numpy())
    out = torch.full((cos.shape[0],), -1, dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return out


@dataclass
class Matching:
    """True features matched one-to-one to latents by decoder cosine: computed once per SAE and
    passed (in place of the directions) to every metric that needs it."""

    directions: torch.Tensor  # [n_features, d_out] unit true directions (in the space the decoder writes)
    cosines: torch.Tensor  # [n_features, d_sae] cos(true direction, decoder row)
    latents: torch.Tensor  # [n_features] the matched latent of each feature (-1: none)


def match_features(sae: SAE, directions: torch.Tensor | Matching) -> Matching:
    """Match the SAE's decoder rows to known directions `[n_features, d_out]` in the space the decoder
    writes (d_in for an SAE; a transcoder world's output directions), a `Matching` passes through."""
    if isinstance(directions, Matching):
        return directions
    width = sae.cfg.output_width
    if directions.dim() != 2 or directions.shape[1] != width:
        raise ConfigError(
            f"true directions must be [n_features, {'d_out' if sae.cfg.is_transcoder else 'd_in'}={width}], the "
            f"width the decoder writes (got {tuple(directions.shape)}); pass the directions of the world the SAE "
            "was trained on (world.directions_for(sae.cfg.write_sites))"
        )
    u = unit_rows(directions.detach().float().cpu())
    cos = u @ unit_rows(sae.W_dec.detach().float().cpu()).t()
    return Matching(u, cos, match_latents(cos))


@dataclass
class RecoveryMetrics:
    mmcs_decoder: float  # mean over true features of the max cosine with any decoder row
    mmcs_encoder: float  # the same with encoder directions (columns of W_enc); NaN for a transcoder
    recovered_fraction: float  # true features matched one-to-one to a latent with decoder cosine >= threshold
    mean_matched_cosine: float  # mean over true features of their match's cosine (-1 where none)
    threshold: float
    matched_cosines: list[float] = field(repr=False, default_factory=list)  # per true feature, its match's cosine
    matched_latents: list[int] = field(repr=False, default_factory=list)  # per true feature, its latent (-1: none)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def ground_truth_recovery(
    sae: SAE, true_directions: torch.Tensor | Matching, threshold: float = 0.9
) -> RecoveryMetrics:
    """Compare the SAE's dictionary with known feature directions `[n_features, d_out]` (or their `Matching`).

    `mmcs_encoder` compares the same directions with encoder columns, so it is NaN for a transcoder,
    whose encoder reads another space (`saelab.evals.circuits.transcoder_recovery` scores it)."""
    m = match_features(sae, true_directions)
    if sae.cfg.is_transcoder:
        mmcs_encoder = float("nan")
    else:
        cos_enc = m.directions @ unit_rows(sae.W_enc.detach().float().cpu().t()).t()
        mmcs_encoder = float(cos_enc.max(1).values.mean())
    have = m.latents >= 0
    matched = torch.full((m.directions.shape[0],), float("nan"))
    matched[have] = m.cosines[have, m.latents[have]]
    scored = matched.nan_to_num(-1.0)
    return RecoveryMetrics(
        mmcs_decoder=float(m.cosines.max(1).values.mean()),
        mmcs_encoder=mmcs_encoder,
        recovered_fraction=float((scored >= threshold).float().mean()),
        mean_matched_cosine=float(scored.mean()),
        threshold=threshold,
        matched_cosines=matched.tolist(),
        matched_latents=m.latents.tolist(),
    )
