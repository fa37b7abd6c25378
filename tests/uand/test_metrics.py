import torch

from saelab.uand.data import DataConfig, UANDTask
from saelab.uand.metrics import evaluate, zero_predictor


def test_perfect_and_zero_predictors():
    task = UANDTask(DataConfig(m=12, s=3))
    x, inputs = task.sample(400, torch.Generator().manual_seed(0))
    perfect = evaluate(lambda inp: task.targets(inp), task, x, x)  # basis inputs are x itself
    assert perfect.mse == 0 and perfect.max_abs == 0 and perfect.balanced_acc == 1.0
    zero = evaluate(zero_predictor(task), task, x, inputs)
    assert zero.acc_pos == 0.0 and zero.acc_neg == 1.0
    assert zero.mse_pos == 1.0 and zero.balanced_mse == 0.5
    assert zero.n_pos == 400 * 3  # C(3, 2) positive pairs per sample
    assert zero.cell_count[3] == zero.n_pos and sum(zero.cell_count) == 400 * 66
