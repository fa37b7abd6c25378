"""The U-AND lab: one-layer ReLU models computing every pairwise boolean function of sparse inputs.

data (task and truth tables) -> model (train any subset of W, b, R, c) -> metrics (per class and
per cell) -> constructions (Hänni sparse, dense binary) -> readout (batched least squares, and
the linear floor of x every AND result is compared with) ->
analysis (density, binarity, neuron classes) -> experiments (the `saelab uand` commands).
"""

from saelab.uand.data import DataConfig, UANDTask, parse_truth_table
from saelab.uand.metrics import Metrics, evaluate
from saelab.uand.model import ModelConfig, TrainConfig, UANDModel, train

__all__ = [
    "DataConfig",
    "UANDTask",
    "parse_truth_table",
    "Metrics",
    "evaluate",
    "ModelConfig",
    "TrainConfig",
    "UANDModel",
    "train",
]
