"""The one training loop (any number of SAEs on one activation stream), and fitted baselines beside it."""

from saelab.train.trainer import TrainConfig, Trainer, TrainResult, fit_dictionary, train, train_many

__all__ = ["TrainConfig", "Trainer", "TrainResult", "fit_dictionary", "train", "train_many"]
