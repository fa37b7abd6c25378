"""Least-squares read-outs for all pairs at once, from one shared Gram matrix.

For a fixed hidden layer h (with a constant 1 appended for the offset c), the read-out of pair
(i, j) solves  (G + ridge I) r_ij = E[h y_ij],  G = E[h h^T]. G is the same for every pair, so
one Cholesky factor serves all C(m, 2) right-hand sides, solved in column chunks to bound memory.

Any truth table is a polynomial f(x_i, x_j) = t00 + a x_i + b x_j + e x_i x_j, so the right-hand
sides come from three statistics collected in one pass over the samples: E[h], E[h x^T] ([d, m])
and E[h x_i x_j] ([d, P], accumulated sparsely from the active pairs only). The same statistics
then give the read-out for *every* table (AND, XOR, ...) without another pass: this is what the
XOR experiment uses.

Plain least squares weights samples by their natural frequency and so shrinks the rare
positives towards 0 (useless once thresholded); the default "cells" weighting counts the four
input cells of each pair equally instead (see `solve_readout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from saelab.errors import ConfigError
from saelab.uand.data import UANDTask, active_pairs, parse_truth_table, table_coefficients


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
    gram = h_x = h_pair_t = None
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
        rows, pairs = active_pairs(x)
        h_pair_t.index_add_(0, pairs, h1[rows])
        done += n
    h_pair = h_pair_t.T.contiguous()
    return HiddenStats(gram=gram, h_x=h_x, h_pair=h_pair, n=n_samples)


def solve_readout(
    stats: HiddenStats,
    task: UANDTask,
    table: str | torch.Tensor | None = None,
    weighting: str = "cells",
    ridge: float = 1e-4,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R [P, d], c [P]) for every pair's table at once; `weighting` picks the objective.

    "natural": plain least squares over the sample distribution. One Cholesky factor of the
    shared Gram matrix, all pairs as right-hand sides.

    "cells" (default): every input cell 00/01/10/11 of the pair weighs 1/4, as if each were
    equally common, so the rare cell 11 (where AND and XOR differ from a linear function) counts.
    Within-cell covariance is approximated by the shared covariance S of h (the interference of
    the other inputs, the same for every pair in the sparse regime); the cell means come from
    the pair statistics. The objective r^T S r + sum_v w_v (r.mu_v + c - t_v)^2 then has a
    rank-4 structure per pair: one Cholesky of S plus a batched 4x4 solve (push-through
    identity), never a d x d solve per pair.
    """
    if task.circuit_table is not None:
        raise ConfigError("least-squares read-outs support two-input tables only, not circuit_op targets")
    table = task.table if table is None else (table if torch.is_tensor(table) else parse_truth_table(table))
    if weighting == "natural":
        return _solve_natural(stats, task, table, ridge)
    if weighting != "cells":
        raise ConfigError(f"weighting={weighting!r}: choose 'cells' or 'natural'")
    n = stats.n
    mean = stats.gram[:-1, -1] / n
    cov = stats.gram[:-1, :-1] / n - torch.outer(mean, mean)
    d = cov.shape[0]
    reg = ridge * cov.diagonal().mean().clamp(min=1e-12) + 1e-10
    factor = torch.linalg.cholesky(cov + reg * torch.eye(d, dtype=cov.dtype))
    i, j = task.pairs
    t = table.to(cov.dtype)
    R = torch.empty(task.n_pairs, d, dtype=cov.dtype)
    c = torch.empty(task.n_pairs, dtype=cov.dtype)
    total = stats.gram[:, -1]  # [d + 1]: sum of h, then the count n
    for start in range(0, task.n_pairs, chunk):
        sl = slice(start, start + chunk)
        s11 = stats.h_pair[:, sl].T  # [p, d + 1]; last column is the count
        si, sj = stats.h_x[:, i[sl]].T, stats.h_x[:, j[sl]].T
        # Cell sums in the order 00, 01, 10, 11 (cell = 2 x_i + x_j).
        cells = torch.stack([total - si - sj + s11, sj - s11, si - s11, s11], dim=1)  # [p, 4, d + 1]
        counts = cells[..., -1]
        present = counts > 0
        mu = cells[..., :-1] / counts.clamp(min=1)[..., None]  # [p, 4, d]
        w = present.to(cov.dtype)
        w = w / w.sum(1, keepdim=True)
        mu_bar = (w[..., None] * mu).sum(1)  # [p, d]
        t_bar = (w * t).sum(1)  # [p]
        U = (mu - mu_bar[:, None]) * present[..., None]  # [p, 4, d]
        t_c = (t - t_bar[:, None]) * present
        Z = torch.cholesky_solve(U.reshape(-1, d).T, factor).T.reshape(U.shape)  # S^-1 U^T, [p, 4, d]
        K = torch.eye(4, dtype=cov.dtype) + w[..., None] * (U @ Z.transpose(1, 2))  # I + D U S^-1 U^T
        a = torch.linalg.solve(K, (w * t_c)[..., None])  # [p, 4, 1]
        r = (Z.transpose(1, 2) @ a).squeeze(-1)  # [p, d]
        R[sl] = r
        c[sl] = t_bar - (r * mu_bar).sum(1)
    return R.float(), c.float()


def _solve_natural(stats: HiddenStats, task: UANDTask, table: torch.Tensor, ridge: float, chunk: int = 65536):
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
    weighting: str = "cells",
    ridge: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect statistics and solve, in one call."""
    stats = collect_stats(hidden, task, n_samples, torch.Generator().manual_seed(seed))
    return solve_readout(stats, task, weighting=weighting, ridge=ridge)
