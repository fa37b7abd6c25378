"""Ground-truth toy worlds."""

from saelab.toys.features import LinearWorld, ToySource
from saelab.toys.worlds import World, make_world

__all__ = ["LinearWorld", "ToySource", "World", "make_world"]
