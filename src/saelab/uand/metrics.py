"""Error of any predictor on the U-AND task, split by class and by input cell.

Positives are rare (about C(s,2) of C(m,2) outputs for AND), so a predictor that outputs zero
everywhere has a tiny plain MSE. Every number here is therefore also given per class
(target 1 vs 0) and per cell (x_i, x_j) = 00/01/10/11; `balanced_mse` (the mean of the two class
MSEs) is the headline error and matches the training loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from saelab.uand.data import UANDTask

CELL_NAMES = ("00", "01", "10", "11")


@dataclass
class Metrics:
    mse: float
    mse_pos: float
    mse_neg: float
    balanced_mse: float
    max_abs: float
    acc: float
    acc_pos: float
    acc_neg: float
    balanced_acc: float
    n_pos: int
    n_neg: int
    cell_mse: list[float]
    cell_acc: list[float]
    cell_count: list[int]

    @property
    def worst_cell_acc(self) -> float:
        """Accuracy of the worst input cell that occurred: low when any cell is computed wrongly."""
        seen = [a for a, n in zip(self.cell_acc, self.cell_count) if n > 0]
        return min(seen) if seen else float("nan")

    @property
    def cell_mse_mean(self) -> float:
        """Mean of the per-cell MSEs: every input cell weighs the same (the 'cells' loss)."""
        seen = [e for e, n in zip(self.cell_mse, self.cell_count) if n > 0]
        return sum(seen) / len(seen) if seen else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["worst_cell_acc"] = self.worst_cell_acc
        out["cell_mse_mean"] = self.cell_mse_mean
        return out


class MetricAccumulator:
    """Streams predictions chunk by chunk so evaluation never holds all [N, P] outputs."""

    def __init__(self) -> None:
        self.sq_class = torch.zeros(2, dtype=torch.float64)
        self.ok_class = torch.zeros(2, dtype=torch.float64)
        self.n_class = torch.zeros(2, dtype=torch.float64)
        self.sq_cell = torch.zeros(4, dtype=torch.float64)
        self.ok_cell = torch.zeros(4, dtype=torch.float64)
        self.n_cell = torch.zeros(4, dtype=torch.float64)
        self.max_abs = 0.0

    def update(
        self, pred: torch.Tensor, y: torch.Tensor, cells: torch.Tensor, count: torch.Tensor | None = None
    ) -> None:
        """Add outputs; `count` (same shape) says how many outputs each entry stands for (default 1).

        Counts let an exact evaluation pass each distinct (input, output) pattern once with its
        multiplicity instead of enumerating every input.
        """
        err = pred - y
        w = torch.ones_like(err, dtype=torch.float64) if count is None else count.double()
        w = w.flatten()
        sq = err.square().double().flatten() * w
        ok = ((pred > 0.5) == (y > 0.5)).double().flatten() * w
        cls = (y > 0.5).long().flatten()
        cell = cells.flatten()
        self.sq_class += torch.bincount(cls, weights=sq, minlength=2)
        self.ok_class += torch.bincount(cls, weights=ok, minlength=2)
        self.n_class += torch.bincount(cls, weights=w, minlength=2)
        self.sq_cell += torch.bincount(cell, weights=sq, minlength=4)
        self.ok_cell += torch.bincount(cell, weights=ok, minlength=4)
        self.n_cell += torch.bincount(cell, weights=w, minlength=4)
        if bool((w > 0).any()):
            self.max_abs = max(self.max_abs, float(err.flatten()[w > 0].abs().max()))

    def result(self) -> Metrics:
        n = self.n_class.clamp(min=1)
        mse_c = (self.sq_class / n).tolist()
        acc_c = (self.ok_class / n).tolist()
        nan = float("nan")
        mse_neg, mse_pos = (mse_c[k] if self.n_class[k] > 0 else nan for k in (0, 1))
        acc_neg, acc_pos = (acc_c[k] if self.n_class[k] > 0 else nan for k in (0, 1))
        total = float(self.n_class.sum())
        present = [v for v in (mse_pos, mse_neg) if v == v]
        present_acc = [v for v in (acc_pos, acc_neg) if v == v]
        n_cell = self.n_cell.clamp(min=1)
        return Metrics(
            mse=float(self.sq_class.sum()) / total,
            mse_pos=mse_pos,
            mse_neg=mse_neg,
            balanced_mse=sum(present) / len(present),
            max_abs=self.max_abs,
            acc=float(self.ok_class.sum()) / total,
            acc_pos=acc_pos,
            acc_neg=acc_neg,
            balanced_acc=sum(present_acc) / len(present_acc),
            n_pos=int(self.n_class[1]),
            n_neg=int(self.n_class[0]),
            cell_mse=[v if c > 0 else nan for v, c in zip((self.sq_cell / n_cell).tolist(), self.n_cell)],
            cell_acc=[v if c > 0 else nan for v, c in zip((self.ok_cell / n_cell).tolist(), self.n_cell)],
            cell_count=[int(c) for c in self.n_cell],
        )


@torch.no_grad()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    task: UANDTask,
    x: torch.Tensor,
    inputs: torch.Tensor,
    chunk: int | None = None,
) -> Metrics:
    """Metrics of `predict(inputs) -> [n, P]` against the task's targets for clean inputs `x`."""
    chunk = chunk or max(1, 2_000_000 // max(task.n_pairs, 1))
    acc = MetricAccumulator()
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk]
        acc.update(predict(inputs[start : start + chunk]), task.targets(xb), task.cells(xb))
    return acc.result()


def zero_predictor(task: UANDTask) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trivial baseline: predict 0 for every output."""
    return lambda inputs: torch.zeros(len(inputs), task.n_pairs)
