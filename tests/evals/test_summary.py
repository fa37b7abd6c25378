"""The one evaluation: a single encoding pass and a single matching give the same numbers as
each metric computed on its own."""

import pytest
import torch

import saelab
from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.evals import core, evaluate, ground_truth_recovery, latent_density, reconstruction_metrics
from saelab.evals import pathology as P
from saelab.evals.core import eval_mode
from saelab.toys.worlds import World

HIERARCHY = {"kind": "hierarchy", "d": 16, "n_roots": 6, "branching": 2, "depth": 2, "root_prob": 0.3,
             "child_prob": 0.4, "magnitude_std": 0.2}  # fmt: skip


def trained(world: World, steps: int = 120):
    """A TopK SAE trained briefly: imperfect, so every metric has something to measure."""
    cfg = {"architecture": "topk", "d_in": world.d_in, "d_sae": 2 * world.n_features, "k": 3}
    return saelab.train(
        cfg, saelab.toys.ToySource(world, 128, seed=1), {"steps": steps, "lr": 1e-2, "progress": False}
    ).sae


def held_out(world: World, n: int = 3):
    gen = torch.Generator().manual_seed(5)
    return [world.sample(512, gen) for _ in range(n)]


def test_the_record_equals_each_metric_computed_on_its_own():
    world = World(HIERARCHY)
    sae, batches = trained(world), held_out(world)
    record = evaluate(sae, batches, world).as_dict()
    rec = reconstruction_metrics(sae, batches)
    dens = latent_density(sae, batches)
    gt = ground_truth_recovery(sae, world.directions)
    pairs = world.parent_child_pairs()
    ab = P.absorption(sae, batches, world.directions, pairs)
    separate = {
        "l0": rec.l0,
        "fvu": rec.fvu,
        "mse": rec.mse,
        "cosine_similarity": rec.cosine_similarity,
        "shrinkage": rec.shrinkage,
        "norm_ratio": rec.norm_ratio,
        "eval_tokens": rec.tokens,
        "dead_fraction": dens.dead_fraction,
        "dense_fraction": dens.dense_fraction,
        "nth_decoder_projection": P.nth_decoder_projection(sae, batches).value,
        "mmcs_decoder": gt.mmcs_decoder,
        "mmcs_encoder": gt.mmcs_encoder,
        "recovered_fraction": gt.recovered_fraction,
        "mean_matched_cosine": gt.mean_matched_cosine,
        "mcc": P.mean_correlation(sae, batches).mcc,
        "feature_magnitude_ratio": P.feature_shrinkage(sae, batches, world.directions).feature_magnitude_ratio,
        "splitting": P.splitting(sae, world.directions, batches).split_fraction,
        "merging": P.merging(sae, batches, world.directions).merged_feature_fraction,
        "absorption": ab.absorption_rate,
        "absorption_baseline": ab.parent_alone_miss_rate,
        "child_decoder_parent_cos": ab.child_decoder_parent_cos,
        "hedging": P.hedging(sae, world.directions, pairs).hedging,
        "absorbing_latents": ab.absorbing_latent_fraction,
        "absorbed_parents": ab.absorbed_parent_fraction,
        "composites_recovered": P.composite_recovery(sae, world.directions, pairs).composites_recovered,
        "composites_recovered_weighted": P.composite_recovery(
            sae, world.directions, pairs, batches
        ).composites_recovered_weighted,
    }
    assert {k: record[k] for k in separate} == separate  # the same code on the same data: exactly equal
    assert record["density_histogram"]["counts"] == dens.histogram_counts
    assert 0 < record["recovered_fraction"] < 1 and record["l0"] == pytest.approx(3.0)


def test_one_encoding_pass_and_one_decoder_matching(monkeypatch):
    world = World(HIERARCHY)
    sae, batches = trained(world, steps=20), held_out(world)
    encodes, matchings = [], []
    real_encode, real_match = sae.encode, core.match_latents

    def counting_encode(x):
        encodes.append(x.shape[0])
        return real_encode(x)

    def counting_match(cost):
        matchings.append(tuple(cost.shape))
        return real_match(cost)

    monkeypatch.setattr(sae, "encode", counting_encode)
    monkeypatch.setattr(core, "match_latents", counting_match)
    monkeypatch.setattr(P, "match_latents", counting_match)
    record = evaluate(sae, batches, world).as_dict()
    assert "absorption" in record and "hedging" in record
    assert encodes == [512] * len(batches)  # each held-out batch encoded once
    # one matching of true features to decoder rows, shared by recovery, shrinkage, absorption and
    # hedging; the MCC's match is on activation correlations, by definition a separate one; parent +
    # child composites get their own (unit and at the data's magnitudes)
    pairs = len(world.parent_child_pairs())
    assert matchings == [(world.n_features, sae.cfg.d_sae)] * 2 + [(pairs, sae.cfg.d_sae)] * 2


def test_without_a_world_only_the_truth_free_metrics_are_reported():
    world = World({"n_features": 16, "d": 8, "firing_prob": 0.2})
    sae = saelab.create({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2})
    record = evaluate(sae, [b.x for b in held_out(world, 2)]).as_dict()
    assert 0 < record["l0"] <= 2.0 and record["eval_tokens"] == 1024  # TopK: at most k active
    assert "nth_decoder_projection" in record and "recovered_fraction" not in record and "mcc" not in record


def test_a_world_needs_batches_with_true_features_and_no_batches_is_an_error():
    world = World({"n_features": 16, "d": 8, "firing_prob": 0.2})
    sae = saelab.create({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2})
    with pytest.raises(ConfigError, match="true `features`"):
        evaluate(sae, [Batch(x=b.x) for b in held_out(world, 1)], world)
    with pytest.raises(ConfigError, match="no batches"):
        evaluate(sae, [], world)


def test_eval_mode_restores_the_training_flag_even_after_an_error():
    sae = saelab.create({"architecture": "relu", "d_in": 8, "d_sae": 16})
    assert sae.training
    with pytest.raises(ConfigError):
        with eval_mode(sae):
            assert not sae.training and not torch.is_grad_enabled()
            sae.encode(torch.zeros(2, 5))  # wrong width
    assert sae.training and torch.is_grad_enabled()
