import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.uand.data import DataConfig, UANDTask, all_inputs
from saelab.uand.metrics import evaluate
from saelab.uand.readout import collect_stats, linear_floor, solve_readout


def test_natural_readout_matches_per_pair_lstsq():
    task = UANDTask(DataConfig(m=8, s=3, op="xor"))
    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    hidden = lambda inputs: torch.relu(inputs @ W.T - 0.5)  # noqa: E731
    stats = collect_stats(hidden, task, 3000, torch.Generator().manual_seed(1), chunk=700)
    R, c = solve_readout(stats, task, weighting="natural", ridge=0.0)
    # direct fit, all pairs as columns, on the same samples
    x, inputs = task.sample(3000, torch.Generator().manual_seed(1))
    h1 = torch.cat([hidden(inputs), torch.ones(3000, 1)], 1).double()
    direct = torch.linalg.lstsq(h1, task.targets(x).double()).solution
    assert torch.allclose(R, direct[:-1].T.float(), atol=1e-3)
    assert torch.allclose(c, direct[-1].float(), atol=1e-3)


def test_cells_readout_gets_every_cell_when_the_table_is_linear_in_h():
    # A hidden layer holding x and every product x_i x_j represents every table exactly.
    task = UANDTask(DataConfig(m=7, s=3))
    i, j = task.pairs
    hidden = lambda inputs: torch.cat([inputs, inputs[:, i] * inputs[:, j]], 1)  # noqa: E731
    stats = collect_stats(hidden, task, 4000, torch.Generator().manual_seed(0))
    x, inputs = task.sample(500, torch.Generator().manual_seed(1))
    for op in ("and", "xor", "or", "1011"):
        t = task.with_op(op)
        R, c = solve_readout(stats, t, ridge=1e-8)
        m = evaluate(lambda inp: hidden(inp) @ R.T + c, t, x, inputs)
        # shared within-cell covariance is an approximation, so not exact, but every cell is right
        assert m.worst_cell_acc == 1.0 and m.max_abs < 0.5


def test_raw_inputs_cannot_read_xor():
    task = UANDTask(DataConfig(m=10, s=3, op="xor"))
    stats = collect_stats(lambda inputs: inputs, task, 5000, torch.Generator().manual_seed(0))
    R, c = solve_readout(stats, task)
    m = evaluate(lambda inp: inp @ R.T + c, task, *task.sample(500, torch.Generator().manual_seed(1)))
    assert m.worst_cell_acc < 0.6  # a linear function of x cannot separate XOR's cells


def _brute_force_floor(task, X, prob, loss):
    """Per-pair weighted least squares on [x, 1] over every input X with probability prob: the definition."""
    Y = task.targets(X).double()
    cells = task.cells(X)
    mass = prob[:, None].expand_as(Y)
    if loss == "mse":
        w = mass / task.n_pairs  # the mean over every output
    else:
        group = (Y > 0.5).long() if loss == "balanced" else cells
        totals = {g: mass[group == g].sum() for g in group.unique().tolist()}
        w = torch.zeros_like(Y)
        for g, total in totals.items():
            w[group == g] = mass[group == g] / (total * len(totals))
    A = torch.cat([X.double(), torch.ones(len(X), 1, dtype=torch.float64)], 1)
    pred = torch.empty_like(Y)
    for p in range(task.n_pairs):
        root = w[:, p].sqrt()
        coef = torch.linalg.lstsq(root[:, None] * A, root * Y[:, p], driver="gelsd").solution
        pred[:, p] = A @ coef
    return float((w * (pred - Y).square()).sum()), pred


def _every_input(task):
    """All 2^m boolean inputs with their probability under the task's sparsity mode."""
    m, s = task.m, task.config.s
    X = ((torch.arange(2**m)[:, None] >> torch.arange(m)) & 1).double()
    k = X.sum(1)
    p = s / m
    bern = p**k * (1 - p) ** (m - k)
    if task.config.sparsity == "bernoulli":
        return X, bern
    if task.config.sparsity == "exact":
        return X, (k == s).double() / math.comb(m, s)
    tail = 1 - sum(math.comb(m, j) * p**j * (1 - p) ** (m - j) for j in range(s))  # P(Binomial >= s)
    return X, torch.where(k < s, bern, torch.where(k == s, tail / math.comb(m, s), 0.0))


@pytest.mark.parametrize(
    "config, loss",
    [
        (dict(m=7, s=3), "balanced"),
        (dict(m=7, s=2), "cells"),
        (dict(m=6, s=3, op="xor"), "cells"),
        (dict(m=6, s=2, op="and", circuit_op="or"), "balanced"),
        (dict(m=6, s=2, sparsity="bernoulli"), "balanced"),
        (dict(m=7, s=3, sparsity="at_most"), "mse"),
        (dict(m=6, s=2, sparsity="at_most", op="or"), "balanced"),
    ],
)
def test_linear_floor_is_the_brute_force_least_squares_over_every_input(config, loss):
    task = UANDTask(DataConfig(**config))
    floor = linear_floor(task, loss)
    X, prob = _every_input(task)
    keep = prob > 0
    objective, pred = _brute_force_floor(task, X[keep].float(), prob[keep], loss)
    assert floor.objective == pytest.approx(objective, rel=1e-6)  # float64 solves; a sample would be ~1e-2 off
    assert torch.allclose(floor.predict(X[keep].float()).double(), pred, atol=1e-5)


def test_linear_floor_thresholds_exactly_s_and_perfectly_and_its_metrics_are_exact():
    # x_i + x_j >= 2 is AND when exactly s inputs are on: the thresholded floor makes no error.
    for m, s in [(8, 2), (12, 3), (30, 2), (100, 3), (1000, 3)]:
        task = UANDTask(DataConfig(m=m, s=s))
        floor = linear_floor(task)
        assert floor.metrics.acc_pos == 1.0 and floor.metrics.acc_neg == 1.0
        assert floor.metrics.balanced_mse == pytest.approx(floor.objective, rel=1e-9)
        if math.comb(m, s) * task.n_pairs < 1e6:  # the exact metrics are those of every input, once each
            x = all_inputs(m, s)
            direct = evaluate(floor.predict, task, x, x)
            assert direct.balanced_mse == pytest.approx(floor.metrics.balanced_mse, rel=1e-5)
            assert direct.n_pos == floor.metrics.n_pos and direct.cell_count == floor.metrics.cell_count
    # AND is x_i + x_j >= 2 whatever the other inputs do, so Bernoulli inputs threshold perfectly too
    # (their metrics come from a sample); XOR is no linear threshold, so its floor errs on a cell.
    loose = linear_floor(UANDTask(DataConfig(m=20, s=4, sparsity="bernoulli")))
    assert loose.metrics is None
    x = loose.task.sample_x(4000, torch.Generator().manual_seed(0))
    assert evaluate(loose.predict, loose.task, x, x).balanced_acc == 1.0
    assert linear_floor(UANDTask(DataConfig(m=20, s=3, op="xor")), "cells").metrics.worst_cell_acc < 0.6


def test_linear_floor_rejects_an_unknown_loss():
    with pytest.raises(ConfigError, match="loss="):
        linear_floor(UANDTask(DataConfig(m=5, s=2)), "hinge")
