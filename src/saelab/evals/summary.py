"""One call that gathers the core metrics of an SAE into a flat record for tables and JSON."""

from __future__ import annotations

from typing import Any

import torch

from saelab.activations.base import Batch
from saelab.evals.core import density_from_counts, ground_truth_recovery, reconstruction_and_firing
from saelab.sae.base import SAE


def evaluate(
    sae: SAE,
    batches: list[Batch],
    true_directions: torch.Tensor | None = None,
    recovery_threshold: float = 0.9,
    dense_threshold: float = 0.1,
) -> dict[str, Any]:
    rec, fired = reconstruction_and_firing(sae, batches)  # one encoding pass for both
    dens = density_from_counts(fired, rec.tokens, dense_threshold=dense_threshold)
    record: dict[str, Any] = {
        "l0": rec.l0,
        "fvu": rec.fvu,
        "explained_variance": rec.explained_variance,
        "mse": rec.mse,
        "cosine_similarity": rec.cosine_similarity,
        "shrinkage": rec.shrinkage,
        "dead_fraction": dens.dead_fraction,
        "dense_fraction": dens.dense_fraction,
        "eval_tokens": rec.tokens,
        "density_histogram": {"log10_edges": dens.histogram_edges, "counts": dens.histogram_counts},
    }
    if true_directions is not None:
        gt = ground_truth_recovery(sae, true_directions, recovery_threshold)
        record.update(
            mmcs_decoder=gt.mmcs_decoder,
            mmcs_encoder=gt.mmcs_encoder,
            recovered_fraction=gt.recovered_fraction,
            recovery_threshold=recovery_threshold,
        )
    return record
