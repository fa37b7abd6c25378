"""Least-squares read-outs for all pairs at once, from one shared Gram matrix.

For a fixed hidden layer h (with a constant 1 appended for the offset c), the read-out of pair
(i, j) solves  (G + ridge I) r_ij = E[h y_ij],  G = E[h h^T]. G is the same for every pair, so
one Cholesky factor serves all C(m, 2) right-hand sides, solved in column chunks to bound memory.

Any truth table is a polynomial f(x_i, x_j) = t00 + a x_i + b x_j + e x_i x_j, so the right-hand
sides come from three statistics collected in one pass over the samples: E[h], E[h x^T] ([d, m])
and E[h x_i x_j] ([d, P], accumulated sparsely from the active pairs only). The same statistics
then give the read-out for *every* table (AND, XOR, ...) without another pass: this is what the
XOR experiment uses.

The fit weights samples by their natural frequency (plain MSE), so it tends to shrink rare
positive outputs; metrics report the per-class error so that shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from saelab.errors import ConfigError
from saelab.uand.data import UANDTask, parse_truth_table, table_coefficients


@dataclass
class HiddenStats:
    """Moments of [h, 1] over n samples (sums, not means)."""

    gram: torch.Tensor  # [k, k], k = d + 1
    h_x: torch.Tensor  # [k, m]
    h_pair: torch.Tensor  # [k, P]
    n: int


@torch.no_grad()
def collect_stats(
    hidden: Callable[[torch.Tensor], torch.Tensor],
    task: UANDTask,
    n_samples: int,
    generator: torch.Generator,
    chunk: int = 2048,
) -> HiddenStats:
    """One pass over fresh samples; never materialises more than a chunk of [n, P]."""
    i, j = task.pairs
    gram = h_x = h_pair = None
    done = 0
    while done < n_samples:
        n = min(chunk, n_samples - done)
        x, inputs = task.sample(n, generator)
        h = hidden(inputs).double()
        h1 = torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], dim=1)
        if gram is None:
            k = h1.shape[1]
            gram = torch.zeros(k, k, dtype=h.dtype)
            h_x = torch.zeros(k, task.m, dtype=h.dtype)
            h_pair_t = torch.zeros(task.n_pairs, k, dtype=h.dtype)  # row-major for index_add_
        gram += h1.T @ h1
        h_x += h1.T @ x.double()
        rows, pairs = torch.nonzero((x[:, i] * x[:, j]) > 0, as_tuple=True)
        h_pair_t.index_add_(0, pairs, h1[rows])
        done += n
    h_pair = h_pair_t.T.contiguous()
    return HiddenStats(gram=gram, h_x=h_x, h_pair=h_pair, n=n_samples)


def solve_readout(
    stats: HiddenStats, task: UANDTask, table: str | torch.Tensor | None = None, ridge: float = 1e-4, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R [P, d], c [P]) minimising the mean squared error of every pair's table at once."""
    if task.circuit_table is not None:
        raise ConfigError("least-squares read-outs support two-input tables only, not circuit_op targets")
    table = task.table if table is None else (table if torch.is_tensor(table) else parse_truth_table(table))
    t00, a, b, e = table_coefficients(table)
    k = stats.gram.shape[0]
    gram = stats.gram / stats.n
    # Scale the ridge by the mean diagonal so it means the same for any activation scale.
    reg = ridge * gram.diagonal()[:-1].mean().clamp(min=1e-12)
    eye = torch.eye(k, dtype=gram.dtype)
    eye[-1, -1] = 0.0  # never shrink the offset
    factor = torch.linalg.cholesky(gram + reg * eye + 1e-10 * torch.eye(k, dtype=gram.dtype))
    i, j = task.pairs
    mean_h = stats.gram[:, -1] / stats.n  # E[[h, 1]]
    h_x = stats.h_x / stats.n
    out = torch.empty(k, task.n_pairs, dtype=gram.dtype)
    for start in range(0, task.n_pairs, chunk):
        sl = slice(start, start + chunk)
        rhs = stats.h_pair[:, sl] / stats.n * e
        if a:
            rhs = rhs + a * h_x[:, i[sl]]
        if b:
            rhs = rhs + b * h_x[:, j[sl]]
        if t00:
            rhs = rhs + t00 * mean_h[:, None]
        out[:, sl] = torch.cholesky_solve(rhs, factor)
    return out[:-1].T.float().contiguous(), out[-1].float().contiguous()


def fit_readout(
    hidden: Callable[[torch.Tensor], torch.Tensor],
    task: UANDTask,
    n_samples: int,
    seed: int = 0,
    ridge: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect statistics and solve, in one call."""
    stats = collect_stats(hidden, task, n_samples, torch.Generator().manual_seed(seed))
    return solve_readout(stats, task, ridge=ridge)
