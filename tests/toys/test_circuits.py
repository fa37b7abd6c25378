"""Transcoder and crosscoder worlds: batch structure, the true map, geometry, resuming, configs."""

import pytest
import torch

from saelab.activations.factory import build_source, held_out, parse_source
from saelab.errors import ConfigError
from saelab.toys.circuits import CATEGORIES, CrosscoderWorld, TranscoderWorld

N = 20_000


def sample(world, n=N, seed=0):
    return world.sample(n, torch.Generator().manual_seed(seed))


def within_sampling_error(freq, p, n):
    sigma = (p * (1 - p) / n).sqrt()
    return bool(((freq - p).abs() <= 5 * sigma + 1e-4).all())  # 5 sigma per feature


# ---------------------------------------------------------------------------- transcoder world
def test_transcoder_batches_carry_both_sites_and_the_target_is_the_mlp_of_the_input():
    world = TranscoderWorld({"n_in": 40, "d_in": 16, "n_out": 30, "d_out": 12, "magnitude_std": 0.3})
    b = sample(world)
    assert b.x.shape == (N, 16) and b.target.shape == (N, 12) and b.features.shape == (N, 40)
    assert set(b.sites) == {"mlp_in", "mlp_out"}
    assert b.sites["mlp_in"] is b.x and b.sites["mlp_out"] is b.target
    assert torch.allclose(b.x, b.features @ world.input_directions, atol=1e-5)
    assert torch.allclose(b.target, world.mlp(b.features), atol=1e-5)
    f_out = world.output_features(b.features)
    assert torch.allclose(f_out, (b.features @ world.connections.t()).clamp_min(0), atol=1e-6)
    # with non-negative weights and no bias the ReLU never clips: y is linear in f_in along v_i
    assert torch.allclose(b.target, b.features @ world.output_directions, atol=1e-5)
    assert within_sampling_error((b.features > 0).float().mean(0), world.probs, N)
    view = b.view("mlp_in", "mlp_out")
    assert view.x is b.x and view.target is b.target


def test_the_sparse_map_has_one_or_two_outputs_per_input_and_shared_outputs():
    world = TranscoderWorld({"n_in": 64, "n_out": 48, "two_output_fraction": 0.25, "seed": 3})
    A = world.connections
    per_input = (A != 0).sum(0)
    assert set(per_input.tolist()) == {1, 2} and int((per_input == 2).sum()) == 16
    per_output = (A != 0).sum(1)
    # 80 connections dealt over 48 outputs in shuffled rounds: each output gets 1 or 2 drivers
    assert set(per_output.tolist()) == {1, 2} and int((per_output == 2).sum()) == 80 - 48
    assert (A >= 0).all()
    assert torch.allclose(world.output_directions.norm(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(world.input_directions.norm(dim=1), torch.ones(64), atol=1e-5)
    # x = f_in @ directions; a dictionary writing mlp_out is matched against the v_i
    assert torch.equal(world.directions, world.input_directions)
    assert torch.equal(world.directions_for(None), world.input_directions)
    assert torch.equal(world.directions_for(["mlp_in"]), world.input_directions)
    assert torch.equal(world.directions_for(["mlp_out"]), world.output_directions)
    with pytest.raises(ConfigError, match="mlp_in"):
        world.directions_for(["resid"])
    assert world.d_in == 32 and world.d_out == 24 and world.n_features == 64


def test_inhibition_and_a_bias_make_the_map_non_linear_but_it_still_holds():
    world = TranscoderWorld(
        {"n_in": 32, "d_in": 16, "n_out": 24, "d_out": 16, "two_output_fraction": 1.0, "inhibitory_fraction": 1.0,
         "output_bias": -0.1, "firing_prob": 0.2}
    )  # fmt: skip
    assert (world.connections < 0).sum() == 32  # every secondary connection is inhibitory
    b = sample(world, 4000)
    assert torch.allclose(b.target, world.mlp(b.features), atol=1e-5)
    assert (world.output_features(b.features) >= 0).all()
    linear = b.features @ world.output_directions
    assert (b.target - linear).abs().max() > 0.05  # the ReLU clips somewhere
    lin_world = TranscoderWorld({**world.cfg.model_dump(), "activation": "linear", "output_bias": 0.0})
    b2 = sample(lin_world, 500)
    assert torch.allclose(b2.target, b2.features @ lin_world.output_directions, atol=1e-5)


# ---------------------------------------------------------------------------- crosscoder world
def test_crosscoder_sites_are_the_halves_of_x_and_each_category_has_its_norms():
    world = CrosscoderWorld({"d": 16, "n_shared": 8, "n_a_only": 6, "n_b_only": 5, "n_rescaled": 4})
    assert world.categories == ["shared"] * 8 + ["a_only"] * 6 + ["b_only"] * 5 + ["rescaled"] * 4
    b = sample(world, 5000)
    assert b.x.shape == (5000, 32) and set(b.sites) == {"a", "b"}
    assert torch.equal(torch.cat([b.sites["a"], b.sites["b"]], 1), b.x)
    assert torch.allclose(b.x, b.features @ world.directions, atol=1e-5)
    assert torch.allclose(world.directions.norm(dim=1), torch.ones(23), atol=1e-5)
    a, s = world.site_scales["a"], world.site_scales["b"]
    assert torch.allclose(a.pow(2) + s.pow(2), torch.ones(23), atol=1e-6)
    r = world.relative_norms
    assert torch.allclose(r[:8], torch.full((8,), 0.5)) and (r[8:14] == 0).all() and (r[14:19] == 1).all()
    assert torch.allclose(r[19:], torch.tensor([1 / 3, 2 / 3, 1 / 3, 2 / 3]), atol=1e-6)  # rescale 0.5, 2 cycled
    assert torch.allclose(s[19:] / a[19:], torch.tensor([0.5, 2.0, 0.5, 2.0]), atol=1e-6)
    # a feature absent at a site writes nothing there
    only_a = b.features[:, world.category_indices("a_only")].sum(1) > 0
    others = b.features.clone()
    others[:, world.category_indices("a_only")] = 0
    assert torch.allclose(b.sites["b"], others @ world.directions[:, 16:], atol=1e-5) and only_a.any()
    assert torch.equal(world.directions_for(None), world.directions)
    assert torch.equal(world.directions_for(["a", "b"]), world.directions)
    assert torch.equal(world.directions_for(["b"]), world.directions[:, 16:])  # b's part, zero for a-only
    assert torch.equal(world.directions_for(["b", "a"]), world.directions.roll(16, 1))
    with pytest.raises(ConfigError, match="'a' and 'b'"):
        world.directions_for(["c"])
    for site in ("a", "b"):
        here = world.site_scales[site] > 0
        norms = world.site_directions[site].norm(dim=1)
        assert torch.allclose(norms[here], torch.ones(int(here.sum())), atol=1e-5) and (norms[~here] == 0).all()


@pytest.mark.parametrize("same", [True, False])
def test_shared_features_point_the_same_way_at_both_sites_only_when_asked(same):
    world = CrosscoderWorld({"d": 32, "same_directions": same, "seed": 1})
    both = torch.tensor([c in ("shared", "rescaled") for c in world.categories])
    cos = (world.site_directions["a"][both] * world.site_directions["b"][both]).sum(1)
    if same:
        assert torch.allclose(cos, torch.ones(int(both.sum())), atol=1e-5)
    else:
        assert cos.abs().max() < 0.9  # independent frames: no feature keeps its direction
    assert sorted(set(world.categories)) == sorted(CATEGORIES)


# ---------------------------------------------------------------------------- as a source
@pytest.mark.parametrize(
    "spec",
    [
        {"type": "transcoder_world", "batch_size": 64, "seed": 2, "world": {"n_in": 24, "d_in": 8, "n_out": 16, "d_out": 12}},
        {"type": "crosscoder_world", "batch_size": 64, "seed": 2, "world": {"d": 8, "n_shared": 6, "noise_std": 0.05}},
    ],
)  # fmt: skip
def test_the_source_resumes_exactly_and_the_held_out_source_is_the_same_world_resampled(spec):
    src = build_source(spec)
    for _ in range(3):
        next(src)
    state = src.state_dict()
    ahead = [next(src) for _ in range(2)]
    again = build_source(spec)
    again.load_state_dict(state)
    for a, b in zip(ahead, [next(again) for _ in range(2)], strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.target, b.target) and torch.equal(a.features, b.features)
        assert all(torch.equal(a.sites[k], b.sites[k]) for k in a.sites)
    ev = held_out(spec).build()
    assert torch.equal(ev.world.directions, src.world.directions)
    assert not torch.equal(next(ev).x, next(build_source(spec)).x)
    assert src.d_in == next(build_source(spec)).x.shape[1]
    assert src.site_widths == {k: v.shape[1] for k, v in ahead[0].sites.items()}


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"type": "transcoder_world", "world": {"n_inn": 4}}, "n_inn"),
        ({"type": "transcoder_world", "world": {"weight_range": [1.0, 0.5]}}, "weight_range"),
        ({"type": "transcoder_world", "world": {"output_bias": 0.5}}, "output_bias"),
        ({"type": "crosscoder_world", "world": {"n_shared": -1}}, "n_shared"),
        ({"type": "crosscoder_world", "world": {"rescale": []}}, "rescale"),
        ({"type": "crosscoder_world", "world": {"n_shared": 0, "n_a_only": 0, "n_b_only": 0, "n_rescaled": 0}}, "no features"),
        ({"type": "crosscoder_world", "worlds": {}}, "worlds"),
    ],
)  # fmt: skip
def test_bad_specs_fail_in_one_line_naming_the_field(spec, field):
    with pytest.raises(ConfigError, match=field) as err:
        build_source(spec)
    assert "\n" not in str(err.value)


def test_both_types_parse_as_run_sources():
    for kind in ("transcoder_world", "crosscoder_world"):
        assert parse_source({"type": kind}).spec()["type"] == kind
