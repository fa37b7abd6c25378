"""Model diffing with dictionaries: crosscoder diffs (relative decoder norms, Latent Scaling) and
a ground-truth two-model world to score them against."""

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
]
