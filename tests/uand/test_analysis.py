import math

import torch

from saelab.uand.analysis import circuit_density, neuron_class_table, readout_sign_agreement, weight_binarity
from saelab.uand.constructions import dense_binary_construction, hanni_construction
from saelab.uand.data import DataConfig, UANDTask


def test_density_separates_dense_from_sparse_constructions():
    task = UANDTask(DataConfig(m=20, s=2))
    _, inputs = task.sample(1000, torch.Generator().manual_seed(0))
    dense = circuit_density(dense_binary_construction(task, 200, -1.0), task, inputs)
    sparse = circuit_density(hanni_construction(task, 200, 0.2), task, inputs)
    assert dense["participation"] > 0.9 and dense["fraction"] > 0.9
    assert abs(sparse["fraction"] - 0.2**2) < 0.02  # only shared neurons matter: about p^2
    assert sparse["participation"] < 0.1


def test_binarity_reference_values():
    g = torch.Generator().manual_seed(0)
    gauss = weight_binarity(torch.randn(200, 500, generator=g))
    assert abs(gauss["cv"] - math.sqrt(math.pi / 2 - 1)) < 0.02
    binary = weight_binarity(torch.where(torch.rand(200, 500, generator=g) < 0.7, 0.3, -0.3))
    assert binary["cv"] < 1e-6 and binary["near_u"] == 1.0
    assert abs(binary["frac_positive"] - 0.7) < 0.01


def test_sign_readout_and_class_table_of_dense_construction():
    task = UANDTask(DataConfig(m=20, s=2))
    model = dense_binary_construction(task, 400, -1.0)
    agree = readout_sign_agreement(model, task)
    assert agree["correlation"] > 0.999 and agree["sign_agreement"] == 1.0
    table = torch.tensor(neuron_class_table(model, task, n_pairs=16, n_samples=32)["mean_activation"])
    a, b1, b2, c = table
    # the kink: class A responds most to (1,1), B1 to (1,0), B2 to (0,1), C is lowest at (1,1)
    assert a.argmax() == 3 and b1.argmax() == 2 and b2.argmax() == 1 and c[3] <= c.min() + 1e-6 and c[3] < c[0]
    # A - B1 - B2 + C is proportional to AND
    combo = a - b1 - b2 + c
    assert combo[3] > 5 * combo[:3].abs().max()
