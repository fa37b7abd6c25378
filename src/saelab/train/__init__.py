"""The one training loop (any number of SAEs on one activation stream), and fitted baselines beside it."""

from saelab.train.e2e import E2EConfig, E2EObjective, E2ESource, train_e2e
from saelab.train.trainer import TrainConfig, Trainer, TrainResult, WarmStart, fit_dictionary, train, train_many

__all__ = [
    "E2EConfig",
    "E2EObjective",
    "E2ESource",
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "WarmStart",
    "fit_dictionary",
    "train",
    "train_many",
    "train_e2e",
]
