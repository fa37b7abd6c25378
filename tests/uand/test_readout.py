import torch

from saelab.uand.data import DataConfig, UANDTask
from saelab.uand.metrics import evaluate
from saelab.uand.readout import collect_stats, solve_readout


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
