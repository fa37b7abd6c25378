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

`linear_floor` is the trivial baseline every U-AND result stands beside: the best read-out of
the raw input x itself, with no hidden layer, solved in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saelab.errors import ConfigError
from saelab.uand.data import UANDTask, active_pairs, apply_table, parse_truth_table, table_coefficients
from saelab.uand.metrics import MetricAccumulator, Metrics


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


@dataclass
class LinearFloor:
    """The best linear read-out of the raw input x (no hidden layer) for one loss, solved exactly.

    With exactly s inputs on, AND of a pair is a linear threshold of x (x_i + x_j >= 2), so this
    read-out can be right on every output once thresholded; a hidden layer is only doing
    computation where it beats this. `coef` multiplies (1, x_i, x_j[, x_k][, T]): x_k is a
    circuit's third input, T the number of other inputs on (absent for sparsity "exact", where
    T = s - x_i - x_j and the offset absorbs it). `objective` is the exact loss; `metrics` are
    exact over all C(m, s) inputs for sparsity "exact" (None for the Bernoulli modes).
    """

    loss: str
    coef: torch.Tensor
    objective: float
    metrics: Metrics | None
    task: UANDTask

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions [n, P] for clean boolean inputs x [n, m] (what the floor reads)."""
        x = x.double()
        cols = _named_columns(self.task)
        coef = self.coef
        out = coef[0] + sum(coef[1 + k] * x[:, col] for k, col in enumerate(cols))
        if len(coef) > 1 + len(cols):  # the count of the other inputs
            named = sum(x[:, col] for col in cols)
            out = out + coef[-1] * (x.sum(1, keepdim=True) - named)
        return out.float()


def _named_columns(task: UANDTask) -> list[torch.Tensor]:
    i, j = task.pairs
    return [i, j] if task.third is None else [i, j, task.third]


def _atoms(task: UANDTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The distinct (named inputs, T) patterns of one pair: features [A, r + 1 or r + 2], probability [A],
    and, for sparsity "exact", how many of the C(m, s) inputs show each pattern (else None).

    Every input distribution here is exchangeable, so a pair's outputs depend on the other
    m - r inputs only through their count T, whose law is exact: hypergeometric (exact),
    binomial (bernoulli), or binomial capped at s with a uniform active set (at_most).
    """
    cfg = task.config
    m, s = cfg.m, cfg.s
    r = 2 if task.third is None else 3
    rest = m - r
    patterns = torch.tensor([[(b >> (r - 1 - k)) & 1 for k in range(r)] for b in range(2**r)], dtype=torch.float64)
    rows, mass, count = [], [], []
    p = s / m

    def log_binom(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    def log_bernoulli(n: int, k: int) -> float:  # log P(Binomial(n, p) = k)
        if p >= 1.0:
            return 0.0 if k == n else -math.inf
        return log_binom(n, k) + k * math.log(p) + (n - k) * math.log1p(-p)

    if cfg.sparsity == "at_most":
        below = [math.exp(log_bernoulli(m, k)) for k in range(s)]
        p_count = [*below, max(0.0, 1.0 - sum(below))]  # P(K = k), K = min(Binomial(m, p), s)
    for pattern in patterns:
        a = int(pattern.sum())
        if cfg.sparsity == "exact":
            if 0 <= s - a <= rest:
                n_inputs = math.comb(rest, s - a)
                rows.append(pattern.tolist())
                mass.append(n_inputs / math.comb(m, s))
                count.append(n_inputs)
            continue
        for t in range(rest + 1):
            if cfg.sparsity == "bernoulli":
                prob = math.exp(log_bernoulli(r, a) - log_binom(r, a) + log_bernoulli(rest, t))
            elif a + t <= s:
                k = a + t
                prob = p_count[k] * math.exp(log_binom(rest, t) - log_binom(m, k))
            else:
                prob = 0.0
            if prob > 0:
                rows.append([*pattern.tolist(), float(t)])
                mass.append(prob)
    feats = torch.cat([torch.ones(len(rows), 1, dtype=torch.float64), torch.tensor(rows, dtype=torch.float64)], 1)
    return feats, torch.tensor(mass, dtype=torch.float64), torch.tensor(count) if count else None


def linear_floor(task: UANDTask, loss: str = "balanced") -> LinearFloor:
    """Closed-form best read-out pred = R x + c of every pair for `loss` ("balanced", "cells", "mse").

    The loss is convex in each pair's (R_p, c_p) and unchanged by permuting the inputs outside
    the pair (the input law is exchangeable and the target ignores them), so averaging any
    optimum over those permutations gives an optimum with one weight for all of them: a
    weighted least squares over the few patterns of `_atoms`, exact, for any m. The class or
    cell weights are global constants of the task, so the pooled loss splits into the same
    problem for every pair.
    """
    feats, mass, count = _atoms(task)
    r = len(_named_columns(task))
    x = feats[:, 1 : 1 + r]
    y = apply_table(task.table.double(), x[:, 0], x[:, 1])
    if task.circuit_table is not None:
        y = apply_table(task.circuit_table.double(), y, x[:, 2])
    cells = (2 * x[:, 0] + x[:, 1]).long()
    if loss == "mse":
        w = mass
    elif loss == "balanced":
        group = (y > 0.5).long()
        w = _group_weights(mass, group)
    elif loss == "cells":
        w = _group_weights(mass, cells)
    else:
        raise ConfigError(f"loss={loss!r}: choose 'balanced', 'cells' or 'mse'")
    root = w.sqrt()
    coef = torch.linalg.lstsq(root[:, None] * feats, (root * y)[:, None], driver="gelsd").solution[:, 0]
    pred = feats @ coef
    objective = float((w * (pred - y).square()).sum())
    metrics = None
    if count is not None:
        acc = MetricAccumulator()
        acc.update(pred, y, cells, count * task.n_pairs)
        metrics = acc.result()
    return LinearFloor(loss=loss, coef=coef, objective=objective, metrics=metrics, task=task)


def _group_weights(mass: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Each present group weighs equally: mass / (group mass * number of groups)."""
    total = torch.zeros(int(group.max()) + 1, dtype=mass.dtype).index_add_(0, group, mass)
    present = int((total > 0).sum())
    return mass / (total[group] * present)
