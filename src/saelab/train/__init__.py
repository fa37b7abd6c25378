"""The one training loop, and sweeps of many SAEs driving it on one activation stream."""

from saelab.train.sweep import Sweep, train_many
from saelab.train.trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["Sweep", "TrainConfig", "Trainer", "TrainResult", "train", "train_many"]
