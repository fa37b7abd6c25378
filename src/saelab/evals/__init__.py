"""Metrics: plain functions of (SAE, batches[, ground truth]) returning dataclasses; `evaluate`
runs them all in one pass."""

from saelab.evals.core import (
    DensityMetrics,
    ReconstructionMetrics,
    RecoveryMetrics,
    ground_truth_recovery,
    latent_density,
    reconstruction_metrics,
)
from saelab.evals.summary import EvalRecord, evaluate

__all__ = [
    "DensityMetrics",
    "EvalRecord",
    "ReconstructionMetrics",
    "RecoveryMetrics",
    "evaluate",
    "ground_truth_recovery",
    "latent_density",
    "reconstruction_metrics",
]
