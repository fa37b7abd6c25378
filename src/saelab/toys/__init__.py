"""Ground-truth toy worlds."""

from saelab.toys.features import ToySource, ToyWorld, ToyWorldConfig
from saelab.toys.worlds import World, make_world

__all__ = ["ToySource", "ToyWorld", "ToyWorldConfig", "World", "make_world"]
