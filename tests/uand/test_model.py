import pytest
import torch

from saelab.errors import ConfigError
from saelab.uand.data import DataConfig, UANDTask
from saelab.uand.metrics import evaluate, zero_predictor
from saelab.uand.model import (
    ModelConfig,
    TrainConfig,
    UANDModel,
    full_output_loss,
    param_groups,
    random_weights,
    sampled_output_loss,
    train,
    uand_loss,
)


def test_random_weight_distributions_have_equal_power():
    g = torch.Generator().manual_seed(0)
    for dist in ["gaussian", "uniform", "binary", "skewed_binary"]:
        w = random_weights((200, 200), dist, g, scale=2.0, skew=0.8)
        assert abs(w.square().mean().sqrt().item() - 2.0) < 0.05
    b = random_weights((200, 200), "skewed_binary", g, scale=0.5, skew=0.8)
    assert set(b.unique().tolist()) == {-0.5, 0.5}
    assert abs((b > 0).float().mean().item() - 0.8) < 0.01


def test_balanced_loss_is_mean_of_class_mses():
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    pred = torch.tensor([[0.5, 0.1, 0.2, 0.3]])
    expect = 0.5 * (0.25 + (0.01 + 0.04 + 0.09) / 3)
    assert uand_loss(pred, y, "balanced").item() == pytest.approx(expect)
    assert uand_loss(pred, y, "mse").item() == pytest.approx((0.25 + 0.14) / 4)


def test_frozen_parameters_get_no_gradient_and_do_not_move():
    task = UANDTask(DataConfig(m=10, s=2))
    model = UANDModel.for_task(task, ModelConfig(d=8, init="binary", frozen=("W", "c")))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, inputs = task.sample(32, torch.Generator().manual_seed(0))
    uand_loss(model(inputs), task.targets(x)).backward()
    assert model.W.grad is None and model.c.grad is None
    assert model.b.grad is not None and model.R.grad is not None
    train(model, task, TrainConfig(steps=20, batch_size=32))
    assert torch.equal(model.W, before["W"]) and torch.equal(model.c, before["c"])
    assert not torch.equal(model.R, before["R"]) and not torch.equal(model.b, before["b"])


def test_two_layer_model_shapes_and_freezing():
    task = UANDTask(DataConfig(m=10, s=2, circuit_op="or"))
    model = UANDModel.for_task(task, ModelConfig(d=12, d2=9, frozen=("W2",)))
    out = model(task.sample(5, torch.Generator().manual_seed(0))[1])
    assert out.shape == (5, 45) and model.hidden(torch.zeros(1, 10)).shape == (1, 9)
    with pytest.raises(ConfigError, match="'frozen'.*W2"):
        ModelConfig(d=4, frozen=("W2",))  # no second layer to freeze


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d": 0}, "'d'"),
        ({"d": -3}, "'d'"),
        ({"frozen": ("W", "Q")}, "'frozen'"),
        ({"init": "cauchy"}, "'init'"),
        ({"skew": 1.5}, "'skew'"),
    ],
)
def test_bad_model_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs)


def test_trained_model_solves_uand_and_beats_zero_predictor():
    task = UANDTask(DataConfig(m=16, s=2))
    x, inputs = task.sample(2000, torch.Generator().manual_seed(123))
    accs = []
    for seed in range(2):
        model = UANDModel.for_task(task, ModelConfig(d=40), seed=seed)
        train(model, task, TrainConfig(steps=400, batch_size=128, lr=1e-2, seed=seed))
        m = evaluate(model, task, x, inputs)
        zero = evaluate(zero_predictor(task), task, x, inputs)
        assert m.mse_pos < 0.25 * zero.mse_pos  # zero predictor has mse_pos = 1
        accs.append(m.balanced_acc)
    assert min(accs) > 0.95


@pytest.mark.parametrize("op, sparsity", [("and", "exact"), ("nand", "bernoulli"), ("xor", "at_most")])
@pytest.mark.parametrize("kind", ["balanced", "cells", "mse"])
def test_sampled_output_loss_is_exact_with_all_columns(op, sparsity, kind):
    task = UANDTask(DataConfig(m=12, s=3, op=op, sparsity=sparsity))
    model = UANDModel.for_task(task, ModelConfig(d=10))
    with torch.no_grad():
        model.R.normal_(0, 0.3)
        model.c.normal_(0, 0.1)
    x, inputs = task.sample(64, torch.Generator().manual_seed(0))
    full = uand_loss(model(inputs), task.targets(x), kind, task.cells(x))
    est = sampled_output_loss(model, task, x, inputs, kind, task.n_pairs, torch.Generator().manual_seed(1))
    assert est.item() == pytest.approx(full.item(), rel=1e-5)


def test_sampled_output_loss_is_unbiased_for_the_mse():
    task = UANDTask(DataConfig(m=15, s=2))
    model = UANDModel.for_task(task, ModelConfig(d=8))
    with torch.no_grad():
        model.R.normal_(0, 0.3)
    x, inputs = task.sample(32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = uand_loss(model(inputs), task.targets(x), "mse").item()
        g = torch.Generator().manual_seed(2)
        draws = torch.tensor([sampled_output_loss(model, task, x, inputs, "mse", 10, g).item() for _ in range(400)])
    assert abs(draws.mean().item() - full) < 4 * draws.std().item() / 20 + 1e-6


def test_training_with_sampled_outputs_learns():
    task = UANDTask(DataConfig(m=16, s=2))
    model = UANDModel.for_task(task, ModelConfig(d=40))
    train(model, task, TrainConfig(steps=400, batch_size=128, lr=1e-2, output_sample=16))
    m = evaluate(model, task, *task.sample(1000, torch.Generator().manual_seed(4)))
    assert m.balanced_acc > 0.95 and m.mse_pos < 0.25


@pytest.mark.parametrize(
    "op, sparsity, circuit",
    [
        ("and", "exact", None),
        ("xor", "bernoulli", None),
        ("or", "at_most", None),
        ("nand", "exact", None),
        ("and", "exact", "or"),
    ],
)
@pytest.mark.parametrize("kind", ["balanced", "cells", "mse"])
def test_full_output_loss_matches_dense_loss_and_its_gradient(op, sparsity, circuit, kind):
    task = UANDTask(DataConfig(m=12, s=3, op=op, sparsity=sparsity, circuit_op=circuit))
    model = UANDModel.for_task(task, ModelConfig(d=10))
    with torch.no_grad():
        model.R.normal_(0, 0.3)
        model.c.normal_(0, 0.1)
    x, inputs = task.sample(64, torch.Generator().manual_seed(0))
    grads = []
    for loss_fn in (
        lambda: uand_loss(model(inputs), task.targets(x), kind, task.cells(x)),
        lambda: full_output_loss(model, task, x, inputs, kind),
    ):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (full, g_full), (fast, g_fast) = grads
    assert fast == pytest.approx(full, rel=1e-5)
    for a, b in zip(g_full, g_fast):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_mup_groups_scale_only_hidden_fan_in_weights():
    task = UANDTask(DataConfig(m=10, s=2, circuit_op="or"))
    model = UANDModel.for_task(task, ModelConfig(d=200, d2=25, frozen=("c",)))
    lrs = {g["name"]: g["lr"] for g in param_groups(model, TrainConfig(lr=0.01, base_width=50))}
    assert lrs == pytest.approx({"W": 0.01, "b": 0.01, "W2": 0.01 * 50 / 200, "b2": 0.01, "R": 0.01 * 50 / 25})
    flat = {g["name"]: g["lr"] for g in param_groups(model, TrainConfig(lr=0.01, base_width=None))}
    assert set(flat.values()) == {0.01} and "c" not in flat
    with pytest.raises(ConfigError, match="'base_width'"):
        TrainConfig(base_width=0)


def test_width_scaled_training_more_neurons_never_hurt():
    # muP for Adam (R's lr ~ 1/d): at fixed lr and steps, a 16x wider layer is at least as good.
    task = UANDTask(DataConfig(m=20, s=2))
    x, inputs = task.sample(1000, torch.Generator().manual_seed(9))
    err = {}
    for d in (12, 192):
        runs = []
        for seed in range(2):
            model = UANDModel.for_task(task, ModelConfig(d=d), seed=seed)
            train(model, task, TrainConfig(steps=300, batch_size=128, seed=seed))
            runs.append(evaluate(model, task, x, inputs).balanced_mse)
        err[d] = sum(runs) / 2
    assert err[192] < 0.7 * err[12]
