import pytest
import torch

from saelab.errors import ConfigError
from saelab.uand.constructions import dense_binary_construction, hanni_construction, sign_product_readout
from saelab.uand.data import DataConfig, UANDTask
from saelab.uand.metrics import evaluate


def sample(task, n, seed):
    return task.sample(n, torch.Generator().manual_seed(seed))


def test_hanni_construction_is_accurate_in_its_regime():
    # s = 2 and small p: interference needs a third active input on a shared neuron, which is
    # rare; p^2 d = 20 shared neurons per pair on average.
    task = UANDTask(DataConfig(m=30, s=2))
    for seed in range(3):
        model = hanni_construction(task, d=2000, p=0.1, seed=seed)
        m = evaluate(model, task, *sample(task, 500, 10 + seed))
        assert m.mse_pos < 1e-10  # both on and nothing else: every shared neuron reads exactly 1
        assert m.acc_pos == 1.0 and m.acc_neg > 0.998
        assert m.mse_neg < 0.01


def test_hanni_error_grows_with_sparsity():
    errs = []
    for s in (2, 6):
        task = UANDTask(DataConfig(m=30, s=s))
        errs.append(evaluate(hanni_construction(task, 1000, 0.15), task, *sample(task, 400, 1)).balanced_mse)
    assert errs[1] > 3 * errs[0]


def test_sign_product_readoff_computes_and_on_noiseless_inputs():
    task = UANDTask(DataConfig(m=20, s=2))
    for seed in range(2):
        model = dense_binary_construction(task, d=3000, bias=-1.0, seed=seed)
        m = evaluate(model, task, *sample(task, 500, 20 + seed))
        assert m.acc_pos > 0.99 and m.acc_neg > 0.99
        assert m.balanced_mse < 0.05
    # the read-out really is the sign product: +1 for classes A and C, -1 for B1 and B2
    W = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, -1.0]])
    small = UANDTask(DataConfig(m=3, s=1))
    assert sign_product_readout(W, small).tolist() == [[1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]


def test_dense_error_shrinks_with_d():
    task = UANDTask(DataConfig(m=30, s=3))
    test = sample(task, 800, 3)
    errs = [
        evaluate(dense_binary_construction(task, d, -1.0, seed=0), task, *test).balanced_mse for d in (30, 300, 3000)
    ]
    assert errs[0] > errs[1] > errs[2]


def test_construction_bad_input():
    task = UANDTask(DataConfig(m=10, s=2))
    with pytest.raises(ConfigError, match="d="):
        hanni_construction(task, 0, 0.1)
    with pytest.raises(ConfigError, match="p="):
        hanni_construction(task, 10, 1.5)
    with pytest.raises(ConfigError, match="readout="):
        dense_binary_construction(task, 10, -1.0, readout="magic")
