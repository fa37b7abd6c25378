import itertools
import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.uand.data import (
    DataConfig,
    UANDTask,
    active_pairs,
    all_inputs,
    pair_indices,
    parse_truth_table,
    touched_pairs,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_exact_mode_has_exactly_s_active():
    task = UANDTask(DataConfig(m=40, s=5))
    x = task.sample_x(5000, gen())
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert (x.sum(1) == 5).all()
    # every input is used: frequencies near s/m (binomial 5-sigma bound)
    freq = x.mean(0)
    sigma = (5 / 40 * (1 - 5 / 40) / 5000) ** 0.5
    assert ((freq - 5 / 40).abs() < 5 * sigma).all()


def test_at_most_and_bernoulli_modes():
    x = UANDTask(DataConfig(m=30, s=4, sparsity="at_most")).sample_x(20000, gen())
    counts = x.sum(1)
    assert counts.max() <= 4 and (counts < 4).any()
    y = UANDTask(DataConfig(m=30, s=4, sparsity="bernoulli")).sample_x(20000, gen(1))
    assert abs(y.sum(1).mean().item() - 4) < 0.1
    assert y.sum(1).max() > 4  # no cap


@pytest.mark.parametrize("op", ["and", "or", "xor", "nand", "0100", "1011"])
def test_targets_follow_truth_table_for_every_pair(op):
    task = UANDTask(DataConfig(m=9, s=3, sparsity="bernoulli", op=op))
    table = parse_truth_table(op)
    x = task.sample_x(300, gen())
    y = task.targets(x)
    cells = task.cells(x)
    assert y.shape == (300, 36)
    for k, (i, j) in enumerate(itertools.combinations(range(9), 2)):
        expect = table[(2 * x[:, i] + x[:, j]).long()]
        assert torch.equal(y[:, k], expect)
        assert torch.equal(cells[:, k], (2 * x[:, i] + x[:, j]).long())


def test_pair_order_matches_combinations():
    i, j = pair_indices(7)
    assert list(zip(i.tolist(), j.tolist())) == list(itertools.combinations(range(7), 2))


def test_circuit_targets_compose_two_tables():
    task = UANDTask(DataConfig(m=8, s=3, op="and", circuit_op="or"))
    x = task.sample_x(200, gen())
    y = task.targets(x)
    i, j = task.pairs
    k = task.third
    assert ((k != i) & (k != j)).all()
    expect = torch.maximum(x[:, i] * x[:, j], x[:, k])
    assert torch.equal(y, expect)


def test_superposition_and_noise():
    task = UANDTask(DataConfig(m=200, s=3, d0=50, noise=0.1))
    x, inputs = task.sample(100, gen())
    assert inputs.shape == (100, 50) and task.n_in == 50
    cos = task.embed.T @ task.embed
    off = cos - torch.eye(200)
    assert off.abs().max() < 0.8 and off.abs().mean() < 0.2
    assert torch.allclose(task.embed.norm(dim=0), torch.ones(200), atol=1e-5)
    # targets stay defined by the clean inputs
    assert torch.equal(task.targets(x), x[:, task.pairs[0]] * x[:, task.pairs[1]])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"m": 5, "s": 6}, "'s'.*s=6 exceeds m=5"),
        ({"op": "0021"}, "'op'"),
        ({"op": "and2"}, "'op'"),
        ({"op": "00011"}, "'op'"),
        ({"sparsity": "dense"}, "'sparsity'"),
        ({"noise": -1.0}, "'noise'"),
        ({"d0": 0}, "'d0'"),
        ({"circuit_op": "xx"}, "'circuit_op'"),
    ],
)
def test_bad_data_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**kwargs)


@pytest.mark.parametrize("sparsity", ["exact", "bernoulli"])
def test_active_pairs_match_dense_products(sparsity):
    task = UANDTask(DataConfig(m=15, s=4, sparsity=sparsity))
    x = task.sample_x(300, gen(3))
    rows, pairs = active_pairs(x)
    dense = torch.zeros(300, task.n_pairs)
    dense[rows, pairs] = 1.0
    assert len(rows) == int(dense.sum())  # no duplicates
    assert torch.equal(dense, x[:, task.pairs[0]] * x[:, task.pairs[1]])


def test_touched_pairs_are_exactly_the_outputs_outside_cell_00():
    task = UANDTask(DataConfig(m=11, s=3, sparsity="bernoulli"))
    x = task.sample_x(200, gen(4))
    rows, pairs = touched_pairs(x)
    dense = torch.zeros(200, task.n_pairs)
    dense[rows, pairs] += 1.0
    assert torch.equal(dense, (task.cells(x) > 0).float())  # each once, none missing
    assert torch.equal(task.targets_at(x, rows, pairs), task.targets(x)[rows, pairs])


def test_all_inputs_lists_every_exactly_s_input_once():
    x = all_inputs(9, 3)
    assert x.shape == (math.comb(9, 3), 9) and bool((x.sum(1) == 3).all())
    assert len({tuple(r) for r in x.tolist()}) == len(x)
    assert torch.equal(all_inputs(5, 1), torch.eye(5))
