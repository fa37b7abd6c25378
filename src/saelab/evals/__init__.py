"""Metrics: plain functions of (SAE, batches[, ground truth]) returning dataclasses."""

from saelab.evals.core import (
    DensityMetrics,
    ReconstructionMetrics,
    RecoveryMetrics,
    ground_truth_recovery,
    latent_density,
    reconstruction_metrics,
)

__all__ = [
    "DensityMetrics",
    "ReconstructionMetrics",
    "RecoveryMetrics",
    "ground_truth_recovery",
    "latent_density",
    "reconstruction_metrics",
]
