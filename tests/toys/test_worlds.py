"""Composable worlds: firing statistics, structure, geometry, bad specs, and use as a training source."""

import pytest
import torch

from saelab.activations.factory import build_source
from saelab.errors import ConfigError
from saelab.toys.worlds import IndependentSpec, World, firing_probabilities, make_world

N_SAMPLES = 40_000


def sample(world, n=N_SAMPLES, seed=0):
    return world.sample(n, torch.Generator().manual_seed(seed))


def within_sampling_error(freq, p, n):
    sigma = (p * (1 - p) / n).sqrt()
    return bool(((freq - p).abs() <= 5 * sigma + 1e-4).all())  # 5 sigma per feature


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "independent", "n_features": 48, "d": 16, "firing": "zipf", "firing_prob": 0.05},
        {"kind": "correlated", "n_features": 32, "d": 32, "firing_prob": 0.1, "group_size": 4, "correlation": 0.7},
        {"kind": "hierarchy", "d": 32, "n_roots": 4, "branching": 2, "depth": 3, "root_prob": 0.3, "child_prob": 0.5},
        {"kind": "bundle", "d": 24, "n_attributes": 8, "n_entities": 20},
    ],
)
def test_every_kind_yields_x_equal_to_features_times_directions_with_the_stated_marginals(spec):
    world = make_world({**spec, "magnitude_std": 0.2})
    batch = sample(world)
    assert batch.x.shape == (N_SAMPLES, world.d_in) and batch.features.shape == (N_SAMPLES, world.n_features)
    assert torch.allclose(batch.x, batch.features @ world.directions, atol=1e-4)
    assert (batch.features >= 0).all()
    assert within_sampling_error((batch.features > 0).float().mean(0), world.probs, N_SAMPLES)
    assert torch.allclose(world.directions.norm(dim=1), torch.ones(world.n_features), atol=1e-5)


def test_same_generator_state_gives_the_same_batch_and_noise_is_added():
    world = make_world({"kind": "independent", "n_features": 16, "d": 8, "noise_std": 0.1})
    a, b = sample(world, 100, 3), sample(world, 100, 3)
    assert torch.equal(a.x, b.x)
    resid = a.x - a.features @ world.directions
    assert 0.07 < float(resid.std()) < 0.13


def test_correlation_sign_follows_the_spec_and_groups_are_independent():
    pos = sample(
        make_world(
            {"kind": "correlated", "n_features": 8, "d": 8, "firing_prob": 0.2, "group_size": 4, "correlation": 0.8}
        )
    )
    neg = sample(
        make_world(
            {"kind": "correlated", "n_features": 8, "d": 8, "firing_prob": 0.3, "group_size": 2, "correlation": -0.9}
        )
    )
    cp = torch.corrcoef((pos.features > 0).float().t())
    cn = torch.corrcoef((neg.features > 0).float().t())
    assert cp[0, 1] > 0.3 and abs(float(cp[0, 4])) < 0.03  # within a group vs across groups
    assert cn[0, 1] < -0.2 and abs(float(cn[0, 2])) < 0.03


def test_hierarchy_children_fire_only_with_parents_and_exclusive_siblings_never_co_fire():
    world = make_world(
        {
            "kind": "hierarchy",
            "d": 64,
            "n_roots": 3,
            "branching": 3,
            "depth": 3,
            "root_prob": 0.5,
            "child_prob": 0.3,
            "mutually_exclusive": True,
        }
    )
    assert world.n_features == 3 + 9 + 27
    act = sample(world).features > 0
    pairs = world.parent_child_pairs()
    assert len(pairs) == 36
    for p, c in pairs:
        assert not (act[:, c] & ~act[:, p]).any()
    for parent in range(12):
        kids = [c for p, c in pairs if p == parent]
        assert int(act[:, kids].sum(1).max()) <= 1
    # marginal of a grandchild is the product down its path
    assert world.probs[12].item() == pytest.approx(0.5 * 0.3 * 0.3)


def test_explicit_nodes_with_non_exclusive_children():
    world = make_world(
        {
            "kind": "hierarchy",
            "d": 8,
            "nodes": [
                {"parent": None, "prob": 0.5},
                {"parent": 0, "prob": 0.5},
                {"parent": 0, "prob": 0.5},
                {"parent": 1, "prob": 1.0},
            ],
        }
    )
    act = sample(world).features > 0
    both = (act[:, 1] & act[:, 2]).float().mean()
    assert 0.11 < float(both) < 0.14  # 0.5 * 0.5 * 0.5 = 0.125
    assert torch.equal(act[:, 3], act[:, 1])  # prob 1 given its parent


def test_bundle_entities_lie_in_the_attribute_span_plus_an_orthogonal_label():
    plain = make_world({"kind": "bundle", "d": 16, "n_attributes": 8, "n_entities": 12, "label_weight": 0.0})
    a = plain.attribute_directions
    ent = plain.directions[:12]
    proj = ent @ a.t() @ a
    assert torch.allclose(proj, ent, atol=1e-5)  # fully in the attributes' span
    for e, bundle in enumerate(plain.bundles):
        cos = ent[e] @ a.t()
        assert torch.allclose(cos[bundle], torch.full((3,), 3**-0.5), atol=1e-5)
    labelled = make_world({"kind": "bundle", "d": 24, "n_attributes": 8, "n_entities": 12, "label_weight": 0.6})
    assert torch.allclose(labelled.label_directions @ labelled.attribute_directions.t(), torch.zeros(12, 8), atol=1e-5)
    cos_label = (labelled.directions[:12] * labelled.label_directions).sum(1)
    assert torch.allclose(cos_label, torch.full((12,), 0.6), atol=1e-4)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"kind": "independent", "firing_prob": 1.5}, "firing_prob"),
        ({"kind": "hierarchy", "nodes": [{"parent": None, "prob": 1.2}]}, "nodes[0].prob"),
        ({"kind": "hierarchy", "root_prob": -0.1}, "root_prob"),
        (
            {"kind": "hierarchy", "nodes": [{"parent": None, "prob": 0.5}, {"parent": 5, "prob": 0.5}]},
            "nodes[1].parent=5 does not exist",
        ),
        ({"kind": "hierarchy", "nodes": [{"parent": 1, "prob": 0.5}, {"parent": 0, "prob": 0.5}]}, "cycle"),
        (
            {
                "kind": "hierarchy",
                "nodes": [
                    {"parent": None, "prob": 0.5, "mutually_exclusive_children": True},
                    {"parent": 0, "prob": 0.7},
                    {"parent": 0, "prob": 0.7},
                ],
            },
            "sum to 1.400",
        ),
        ({"kind": "bundle", "d": 8, "n_attributes": 16}, "d=8 is smaller than n_attributes=16"),
        ({"kind": "bundle", "d": 16, "n_attributes": 16, "label_weight": 0.5}, "label_weight>0 needs d > n_attributes"),
        ({"kind": "correlated", "n_features": 10, "group_size": 4}, "group_size=4 must divide n_features=10"),
        ({"kind": "correlated", "n_features": 8, "group_size": 4, "correlation": -0.6}, "correlation=-0.6"),
        ({"kind": "independent", "colour": "red"}, "unknown key 'colour'"),
        ({"kind": "spiral"}, "unknown world kind 'spiral'"),
    ],
)
def test_bad_specs_fail_naming_the_field(spec, field):
    with pytest.raises(
        ConfigError, match=field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.").replace(">", ">")
    ):
        World(spec)


def test_world_source_streams_for_training_and_rejects_unknown_keys():
    src = build_source({"type": "world", "world": {"kind": "hierarchy", "d": 16, "n_roots": 2}, "batch_size": 32})
    batch = next(src)
    assert batch.x.shape == (32, 16) and batch.features.shape[1] == src.world.n_features
    state = src.state_dict()
    nxt = next(src)
    src.load_state_dict(state)
    assert torch.equal(next(src).x, nxt.x)
    with pytest.raises(ConfigError, match="valid keys"):
        build_source({"type": "world", "worlds": {}})


# ---------------------------------------------------------------------------- the independent kind
def test_firing_frequencies_match_the_probabilities_within_sampling_error():
    world = World({"n_features": 64, "d": 32, "firing": "zipf", "firing_prob": 0.05, "zipf_exponent": 1.0})
    n = 40_000
    feats = world.sample_features(n, torch.Generator().manual_seed(0))
    freq = (feats > 0).float().mean(0)
    p = world.probs
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-4).all()  # 5 sigma per feature: a false alarm is ~1e-5
    assert p.mean().item() == pytest.approx(0.05, rel=1e-4)
    assert (p[:-1] >= p[1:]).all()  # Zipf: decreasing


def test_zipf_probabilities_are_clipped_at_one_keeping_the_mean():
    p = firing_probabilities(IndependentSpec(n_features=10, d=4, firing="zipf", firing_prob=0.5, zipf_exponent=3.0))
    assert p.max() <= 1.0 and p.mean().item() == pytest.approx(0.5, rel=1e-3)


def test_magnitudes_have_the_chosen_mean_and_std_and_are_non_negative():
    world = World({"n_features": 16, "d": 16, "firing_prob": 0.5, "magnitude_mean": 2.0, "magnitude_std": 0.3})
    feats = world.sample_features(20_000, torch.Generator().manual_seed(1))
    active = feats[feats > 0]
    assert (feats >= 0).all()
    assert active.mean().item() == pytest.approx(2.0, abs=0.01)
    assert active.std().item() == pytest.approx(0.3, abs=0.01)


def test_activations_are_the_features_times_directions():
    world = World({"n_features": 20, "d": 8})
    batch = world.sample(100, torch.Generator().manual_seed(2))
    torch.testing.assert_close(batch.x, batch.features @ world.directions)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"firing_prob": 0}, "firing_prob"),
        ({"n_features": -3}, "n_features"),
        ({"magnitude_mean": -1.0}, "magnitude_mean"),
        ({"dim": 3}, "dim"),
        ({"target_cos_sim": 1.5}, "target_cos_sim"),
    ],
)
def test_bad_independent_world_settings_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        World(bad)
