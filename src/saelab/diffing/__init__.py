"""Model diffing with dictionaries: crosscoder diffs (relative decoder norms, Latent Scaling),
stage-wise diffs (latent rotations through data and model changes against a control) and a
ground-truth two-model world to score them against."""

from saelab.diffing.crosscoder import (
    CATEGORIES,
    DiffResult,
    LatentScaling,
    Thresholds,
    categorize,
    closed_form_beta,
    decoder_cosines,
    diff_crosscoder,
    firing_rates,
    latent_scaling,
    model_slots,
    relative_norms,
)
from saelab.diffing.stages import STAGE_DATA, StagesResult, train_stages

__all__ = [
    "CATEGORIES",
    "DiffResult",
    "LatentScaling",
    "Thresholds",
    "categorize",
    "closed_form_beta",
    "decoder_cosines",
    "diff_crosscoder",
    "firing_rates",
    "latent_scaling",
    "model_slots",
    "relative_norms",
    "STAGE_DATA",
    "StagesResult",
    "train_stages",
]
