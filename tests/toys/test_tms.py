"""Toy models of superposition: geometry by construction, and superposition appearing with sparsity."""

import math

import pytest
import torch

from saelab.activations.factory import build_source
from saelab.errors import ConfigError
from saelab.toys.features import LinearWorld
from saelab.toys.tms import TMSConfig, TMSWorld, phase_diagram, tms_geometry, train_tms


def test_geometry_of_known_configurations():
    # 2 dims: two orthogonal features and an antipodal pair sharing the second dimension
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, -1.0, 0.0]])
    g = tms_geometry(w, 0.1)
    assert g.n_represented == 3
    assert g.norms == pytest.approx([1, 1, 1, 0])
    assert g.dimensionality[:3] == pytest.approx([1.0, 0.5, 0.5])
    assert g.dimensions_per_feature == pytest.approx(2 / 3)
    # a pentagon in 2 dims: every feature has dimensionality 2/5
    angles = torch.arange(5) * 2 * math.pi / 5
    pent = torch.stack([angles.cos(), angles.sin()])
    assert tms_geometry(pent, 0.01).dimensionality == pytest.approx([0.4] * 5, abs=1e-5)


def test_sparser_features_are_stored_in_superposition():
    torch.set_num_threads(1)
    res = train_tms(
        {
            "n_features": 12,
            "d_hidden": 3,
            "feature_probs": [1.0, 0.03],
            "steps": 1500,
            "batch_size": 512,
            "lr": 3e-3,
            "importance_decay": 0.9,
        }
    )
    dense, sparse = res.geometry
    assert dense.n_represented <= 4  # about d features when dense
    assert sparse.n_represented >= 6  # many more than d when sparse
    assert sparse.dimensions_per_feature < dense.dimensions_per_feature


def test_phase_diagram_has_all_three_phases():
    torch.set_num_threads(1)
    d = phase_diagram([1.0, 0.03], [0.1, 5.0], restarts=2, steps=1500)
    phases = {p for row in d.phase for p in row}
    assert d.phase[0][0] == 0  # dense and unimportant: ignored
    assert d.phase[1][0] == 1  # dense and more important: gets the dimension alone
    assert 2 in phases  # sparse: superposition


def test_tms_source_and_bad_config():
    torch.set_num_threads(1)
    src = build_source({"type": "tms", "tms": {"n_features": 6, "d_hidden": 2, "steps": 50}, "batch_size": 16})
    b = next(src)
    assert b.x.shape == (16, 2) and torch.allclose(b.x, b.features @ src.world.directions, atol=1e-5)
    with pytest.raises(ConfigError, match="feature_probs"):
        TMSConfig.parse({"feature_probs": [0.5, 1.5]})
    with pytest.raises(ConfigError, match="unknown key"):
        build_source({"type": "tms", "tms": {"n_feature": 3}})


def test_a_tms_world_is_a_linear_world_with_the_stated_sparsity():
    torch.set_num_threads(1)
    world = TMSWorld({"n_features": 8, "d_hidden": 3, "feature_prob": 0.2, "steps": 50})
    assert isinstance(world, LinearWorld)
    assert world.d_in == 3 and world.n_features == 8 and world.expected_l0 == pytest.approx(8 * 0.2)
    assert world.parent_child_pairs() == []
    n = 40_000
    batch = world.sample(n, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.x, batch.features @ world.directions)
    freq = (batch.features > 0).float().mean(0)
    assert ((freq - 0.2).abs() <= 5 * (0.2 * 0.8 / n) ** 0.5).all()  # 5 sigma per feature
    active = batch.features[batch.features > 0]
    assert float(active.max()) <= 1.0 and active.mean().item() == pytest.approx(0.5, abs=0.01)  # U[0, 1]
