"""Matplotlib set-up shared by every report: a headless backend and one figure style."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # reports are written to files; never needs a display

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "new_figure"]


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 4.0)):
    """A figure with `nrows x ncols` axes, each `size` inches."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes
