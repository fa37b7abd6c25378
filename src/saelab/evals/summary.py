"""The one evaluation behind `saelab demo`, `saelab bench toy` and `saelab eval`.

`evaluate` encodes the held-out batches once, and with a ground-truth world matches latents to
true features once, then hands that pass and that matching to every metric; `EvalRecord.as_dict`
is the flat record the reports print and write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saelab.evals import pathology as P
from saelab.evals.circuits import CrosscoderRecovery, TranscoderRecovery, crosscoder_recovery, transcoder_recovery
from saelab.evals.core import (
    DensityMetrics,
    ReconstructionMetrics,
    ReconstructionSums,
    RecoveryMetrics,
    density_from_counts,
    encoded,
    eval_mode,
    ground_truth_recovery,
    match_features,
)
from saelab.sae.base import SAE
from saelab.toys.features import LinearWorld


@dataclass
class GroundTruthMetrics:
    """What a world's known features add: recovery, MCC, per-feature shrinkage, splitting and
    merging; absorption, hedging and parent + child composites for a hierarchy; entities versus
    attributes for a bundle world; encoder/output recovery for a transcoder world; per-category
    recovery for a crosscoder world."""

    recovery: RecoveryMetrics
    correlation: P.CorrelationMetrics
    feature_shrinkage: P.FeatureShrinkage
    splitting: P.SplittingMetrics
    merging: P.MergingMetrics
    absorption: P.AbsorptionMetrics | None = None
    hedging: P.HedgingMetrics | None = None
    composites: P.CompositeRecovery | None = None
    bundle: P.BundleMetrics | None = None
    transcoder: TranscoderRecovery | None = None
    crosscoder: CrosscoderRecovery | None = None

    def as_dict(self) -> dict[str, Any]:
        rec = self.recovery
        out: dict[str, Any] = {
            "mmcs_decoder": rec.mmcs_decoder,
            "mmcs_encoder": rec.mmcs_encoder,
            "recovered_fraction": rec.recovered_fraction,
            "recovery_threshold": rec.threshold,
            "mean_matched_cosine": rec.mean_matched_cosine,
            "mcc": self.correlation.mcc,
            "feature_magnitude_ratio": self.feature_shrinkage.feature_magnitude_ratio,
            "splitting": self.splitting.split_fraction,
            "merging": self.merging.merged_feature_fraction,
        }
        if self.absorption is not None and self.hedging is not None:
            out.update(
                absorption=self.absorption.absorption_rate,
                absorption_baseline=self.absorption.parent_alone_miss_rate,
                child_decoder_parent_cos=self.absorption.child_decoder_parent_cos,
                absorbing_latents=self.absorption.absorbing_latent_fraction,
                absorbed_parents=self.absorption.absorbed_parent_fraction,
                hedging=self.hedging.hedging,
            )
        if self.composites is not None:
            out.update(
                composites_recovered=self.composites.composites_recovered,
                composites_recovered_weighted=self.composites.composites_recovered_weighted,
            )
        if self.bundle is not None:
            out.update(
                entity_recovered=self.bundle.entity_recovered,
                attribute_recovered=self.bundle.attribute_recovered,
                label_recovered=self.bundle.label_recovered,
            )
        if self.transcoder is not None:
            out.update(
                transcoder_encoder_recovered=self.transcoder.encoder_recovered,
                transcoder_output_recovered=self.transcoder.output_recovered,
                transcoder_both_recovered=self.transcoder.both_recovered,
            )
        if self.crosscoder is not None:
            for cat, v in self.crosscoder.recovered.items():
                out[f"crosscoder_recovered_{cat}"] = v
            for cat, v in self.crosscoder.category_accuracy.items():
                out[f"crosscoder_category_accuracy_{cat}"] = v
        return out


class SiteSums:
    """Per-site reconstruction of a dictionary that writes several sites (a crosscoder), and a
    skip transcoder's parts: the affine skip alone (x W_skip^T + b_dec) and the dictionary alone."""

    def __init__(self, sae: SAE):
        self.sae = sae
        names = sae.cfg.write_sites if sae.cfg.n_sites > 1 else []
        self.sites = {name: ReconstructionSums(sae.cfg.d_sae) for name in names}
        self.parts = (
            {"skip_only": ReconstructionSums(sae.cfg.d_sae), "dictionary_only": ReconstructionSums(sae.cfg.d_sae)}
            if sae.cfg.skip
            else {}
        )

    def __bool__(self) -> bool:
        return bool(self.sites or self.parts)

    def add(self, target, x, f, x_hat) -> None:
        if self.sites:
            for sums, y, y_hat in zip(
                self.sites.values(), target.chunk(len(self.sites), -1), x_hat.chunk(len(self.sites), -1)
            ):
                sums.add(y, f, y_hat)
        if self.parts:
            skip = self.sae.skip_out(x)
            self.parts["skip_only"].add(target, f, skip + self.sae.b_dec)
            self.parts["dictionary_only"].add(target, f, x_hat - skip)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sites:
            out["per_site"] = {
                name: {"fvu": m.fvu, "explained_variance": m.explained_variance, "mse": m.mse}
                for name, m in ((n, s.metrics()) for n, s in self.sites.items())
            }
        for name, sums in self.parts.items():
            out[f"fvu_{name}"] = sums.metrics().fvu
        return out


@dataclass
class EvalRecord:
    reconstruction: ReconstructionMetrics
    density: DensityMetrics
    nth_decoder_projection: P.NthDecoderProjection
    ground_truth: GroundTruthMetrics | None = None  # None without a world (real activations)
    sites: dict[str, Any] | None = None  # per-site FVU (crosscoders), skip-alone FVU (skip transcoders)

    def as_dict(self) -> dict[str, Any]:
        """The flat record: scalars by name, plus the density histogram."""
        rec, dens = self.reconstruction, self.density
        out: dict[str, Any] = {
            "l0": rec.l0,
            "fvu": rec.fvu,
            "explained_variance": rec.explained_variance,
            "mse": rec.mse,
            "cosine_similarity": rec.cosine_similarity,
            "shrinkage": rec.shrinkage,
            "norm_ratio": rec.norm_ratio,
            "dead_fraction": dens.dead_fraction,
            "dense_fraction": dens.dense_fraction,
            "nth_decoder_projection": self.nth_decoder_projection.value,
            "eval_tokens": rec.tokens,
            "density_histogram": {"log10_edges": dens.histogram_edges, "counts": dens.histogram_counts},
        }
        if self.sites:
            out.update(self.sites)
        if self.ground_truth is not None:
            out.update(self.ground_truth.as_dict())
        return out


def evaluate(
    sae: SAE,
    batches: list,
    world: LinearWorld | None = None,
    recovery_threshold: float = 0.9,
    dense_threshold: float = 0.1,
) -> EvalRecord:
    """Every metric of `sae` on held-out `batches` from one encoding pass.

    `world` (e.g. a `saelab.toys.World`) adds the ground-truth metrics; its batches
    must then carry their true `features`. Latents are matched to its features once, and that
    matching serves recovery, shrinkage, absorption and hedging alike.
    """
    sums = ReconstructionSums(sae.cfg.d_sae)
    per_site = SiteSums(sae)
    n = P.nth_projection_index(sae)
    projections, kept = [], []
    with eval_mode(sae):
        for step in encoded(sae, batches):
            batch, x, f, x_hat = step
            sums.add(batch.target, f, x_hat)
            if per_site:
                per_site.add(batch.target, x, f, x_hat)
            projections.append(P.decoder_projection_at(sae, batch.target, n))
            if world is not None:
                kept.append(step)
    rec = sums.metrics()
    record = EvalRecord(
        reconstruction=rec,
        density=density_from_counts(sums.fired, rec.tokens, dense_threshold=dense_threshold),
        nth_decoder_projection=P.mean_projection(projections, n),
        sites=per_site.as_dict() if per_site else None,
    )
    if world is not None:
        record.ground_truth = _ground_truth(sae, P.Collected.gather(kept), world, recovery_threshold)
    return record


def _ground_truth(sae: SAE, data: P.Collected, world: LinearWorld, threshold: float) -> GroundTruthMetrics:
    match = match_features(sae, world.directions_for(sae.cfg.write_sites))
    gt = GroundTruthMetrics(
        recovery=ground_truth_recovery(sae, match, threshold),
        correlation=P.mean_correlation(sae, data),
        feature_shrinkage=P.feature_shrinkage(sae, data, match),
        splitting=P.splitting(sae, match, data),
        merging=P.merging(sae, data, match),
    )
    pairs = world.parent_child_pairs()
    if pairs:
        gt.absorption = P.absorption(sae, data, match, pairs, threshold=threshold)
        gt.hedging = P.hedging(sae, match, pairs, threshold)
        gt.composites = P.composite_recovery(sae, match, pairs, data, threshold)
    if getattr(world, "bundles", None) is not None:
        gt.bundle = P.bundle_decomposition(sae, world)
    if sae.cfg.is_transcoder and hasattr(world, "output_directions"):  # a transcoder on a transcoder world
        gt.transcoder = transcoder_recovery(sae, world, threshold)
    if hasattr(world, "relative_norms") and sae.cfg.write_sites in (None, list(world.sites)):  # writes [a, b]
        gt.crosscoder = crosscoder_recovery(sae, world, threshold)
    return gt
