"""Ground-truth toy worlds."""

from saelab.toys.features import ToySource, ToyWorld, ToyWorldConfig

__all__ = ["ToySource", "ToyWorld", "ToyWorldConfig"]
