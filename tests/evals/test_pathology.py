"""Pathology metrics on hand-built SAEs whose answers are known by construction."""

import math

import pytest
import torch

import saelab
from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.evals import ground_truth_recovery, reconstruction_metrics
from saelab.evals import pathology as P
from saelab.toys.worlds import make_world


def hand_sae(dec: torch.Tensor, enc: torch.Tensor | None = None, b_enc: torch.Tensor | None = None):
    """A ReLU SAE with the given decoder rows [M, d] and encoder columns (default: dec^T)."""
    m, d = dec.shape
    sae = saelab.create({"architecture": "relu", "d_in": d, "d_sae": m})
    with torch.no_grad():
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(dec.t() if enc is None else enc)
        sae.b_enc.copy_(torch.zeros(m) if b_enc is None else b_enc)
        sae.b_dec.zero_()
    return sae.eval()


def world_and_data(spec, n=8192, seed=0):
    world = make_world(spec)
    return world, [world.sample(n // 4, torch.Generator().manual_seed(seed + i)) for i in range(4)]


PARENT_CHILD = {
    "kind": "hierarchy",
    "d": 8,
    "nodes": [{"parent": None, "prob": 0.3}, {"parent": 0, "prob": 0.4}, {"parent": None, "prob": 0.3}],
}


def test_the_true_dictionary_is_perfect_on_every_metric():
    world, data = world_and_data(PARENT_CHILD)
    sae = hand_sae(world.directions)
    rec = ground_truth_recovery(sae, world.directions)
    assert rec.recovered_fraction == 1.0 and P.mean_correlation(sae, data).mcc == pytest.approx(1.0, abs=1e-5)
    assert rec.matched_latents == [0, 1, 2]
    ab = P.absorption(sae, data, world.directions, world.parent_child_pairs())
    assert (
        ab.absorption_rate == 0.0
        and ab.parent_alone_miss_rate == 0.0
        and ab.absorbed_fraction == pytest.approx(0, abs=1e-6)
    )
    assert P.hedging(sae, world.directions, world.parent_child_pairs()).hedging == pytest.approx(0, abs=1e-6)
    assert P.splitting(sae, world.directions, data).split_fraction == 0.0
    assert P.merging(sae, data, world.directions).merged_feature_fraction == 0.0
    gamma = reconstruction_metrics(sae, data).shrinkage
    ratio = P.feature_shrinkage(sae, data, world.directions).feature_magnitude_ratio
    assert gamma == pytest.approx(1.0, abs=1e-5) and ratio == pytest.approx(1.0, abs=1e-5)


def test_an_absorbing_child_latent_is_detected():
    """Chanin et al.'s absorbed solution: child latent decodes parent + child, parent latent's
    encoder is inhibited by the child, so it is silent whenever the child fires."""
    world, data = world_and_data(PARENT_CHILD)
    u = world.directions
    dec = torch.stack([u[0], (u[0] + u[1]) / math.sqrt(2), u[2]])
    enc = torch.stack([u[0] - u[1], math.sqrt(2) * u[1], u[2]]).t()
    sae = hand_sae(dec, enc)
    x = data[0].x
    assert torch.allclose(sae(x), x, atol=1e-5)  # still a perfect reconstruction (magnitude std 0)
    ab = P.absorption(sae, data, u, world.parent_child_pairs())
    assert ab.absorption_rate == 1.0 and ab.parent_alone_miss_rate == 0.0
    assert ab.child_decoder_parent_cos == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert ab.child_encoder_parent_cos == pytest.approx(0.0, abs=1e-5)
    assert ab.absorbed_fraction == pytest.approx(1.0, abs=1e-4)


def test_hedging_sees_a_child_leaking_into_its_parent_latent():
    world, _ = world_and_data(PARENT_CHILD)
    u = world.directions
    sae = hand_sae(torch.stack([0.8 * u[0] + 0.6 * u[1], u[1], u[2]]))
    assert P.hedging(sae, u, world.parent_child_pairs()).hedging == pytest.approx(0.6, abs=1e-5)


def test_splitting_counts_duplicate_latents_and_merging_counts_mixed_ones():
    world, data = world_and_data({"kind": "independent", "n_features": 4, "d": 8, "firing_prob": 0.3})
    u = world.directions
    split = hand_sae(torch.stack([u[0], u[0], u[1], u[2], u[3]]), b_enc=torch.zeros(5))
    s = P.splitting(split, u, data)
    assert s.split_fraction == 0.25 and s.latents_per_feature == pytest.approx(5 / 4)
    merged = hand_sae(torch.stack([(u[0] + u[1]) / math.sqrt(2), u[2], u[3], u[3]]))
    m = P.merging(merged, data, u)
    assert m.merged_feature_fraction == 0.5 and m.merged_latent_fraction == pytest.approx(1 / 4)


def test_merging_ignores_overlap_the_true_directions_already_have():
    world, data = world_and_data({"kind": "independent", "n_features": 24, "d": 6, "firing_prob": 0.05})
    assert world.interference()["max_abs_cos"] > 0.3  # strong superposition
    assert P.merging(hand_sae(world.directions), data, world.directions).merged_feature_fraction == 0.0


def test_shrinkage_of_a_scaled_decoder():
    world, data = world_and_data({"kind": "independent", "n_features": 6, "d": 8, "firing_prob": 0.3})
    sae = hand_sae(0.5 * world.directions, enc=world.directions.t())
    rec = reconstruction_metrics(sae, data)
    assert rec.shrinkage == pytest.approx(0.5, abs=1e-5) and rec.norm_ratio == pytest.approx(0.5, abs=1e-5)
    assert P.feature_shrinkage(sae, data, world.directions).feature_magnitude_ratio == pytest.approx(0.5, abs=1e-5)


def test_nth_decoder_projection_is_the_nth_largest_projection_per_token():
    world, data = world_and_data({"kind": "independent", "n_features": 4, "d": 4, "firing_prob": 1.0})
    sae = hand_sae(world.directions)  # every feature active with magnitude 1: projections are all 1
    assert P.nth_decoder_projection(sae, data, n=4).value == pytest.approx(1.0, abs=1e-5)
    mixed = hand_sae(torch.stack([world.directions[0] + world.directions[1]] * 4))
    assert P.nth_decoder_projection(mixed, data, n=4).value == pytest.approx(math.sqrt(2), abs=1e-5)
    with pytest.raises(ConfigError, match="n=9"):
        P.nth_decoder_projection(sae, data, n=9)


def test_bundle_decomposition_tells_entities_from_attributes():
    world = make_world({"kind": "bundle", "d": 24, "n_attributes": 8, "n_entities": 12, "label_weight": 0.5})
    ents = P.bundle_decomposition(hand_sae(world.directions[:12]), world)
    assert ents.entity_recovered == 1.0 and ents.attribute_recovered == 0.0 and ents.label_recovered == 0.0
    atoms = P.bundle_decomposition(hand_sae(torch.cat([world.attribute_directions, world.label_directions])), world)
    assert atoms.entity_recovered == 0.0 and atoms.attribute_recovered == 1.0 and atoms.label_recovered == 1.0


def test_bad_inputs_name_the_problem():
    world, data = world_and_data(PARENT_CHILD)
    sae = hand_sae(world.directions)
    with pytest.raises(ConfigError, match="d_in=8"):
        ground_truth_recovery(sae, torch.randn(3, 5))
    with pytest.raises(ConfigError, match="true `features`"):
        P.collect(sae, [Batch(x=data[0].x)])
    with pytest.raises(ConfigError, match="no hierarchy"):
        P.absorption(sae, data, world.directions, [])
    with pytest.raises(ConfigError, match="bundle world"):
        P.bundle_decomposition(sae, world)
