"""Parent + child composites: hand-built dictionaries with known answers, and a trained SAE.

Measured before writing the bounds (TopK, k = 2, d_sae = 12, 250 steps at lr 1e-2 on the world
below, seeds 0-2): composites recovered 1.00 on every seed, features recovered 0.083, absorbed
parents 0.75, FVU 0.07.
"""

import math

import pytest
import torch

import saelab
from saelab.bench.toy import world_spec
from saelab.evals import evaluate
from saelab.evals import pathology as P
from saelab.toys.absorption import hand_built, reference_dictionaries
from saelab.toys.features import ToySource
from saelab.toys.worlds import World

SEEDS = [0, 1, 2]
SMALL = {"kind": "hierarchy", "d": 16, "n_roots": 4, "branching": 2, "depth": 2, "root_prob": 0.25,
         "child_prob": 0.45, "mutually_exclusive": True, "magnitude_std": 0.1}  # fmt: skip


def held_out(world: World, seed: int, n: int = 2) -> list:
    gen = torch.Generator().manual_seed(77 + seed)
    return [world.sample(1024, gen) for _ in range(n)]


@pytest.mark.parametrize("quick", [True, False])
def test_reference_dictionaries_score_what_they_are_built_to(quick):
    for seed in SEEDS:
        world = World(world_spec("hierarchical", quick, seed))
        data = held_out(world, seed)
        refs = {name: evaluate(sae, data, world).as_dict() for name, sae in reference_dictionaries(world, seed).items()}
        truth, comp, rand = refs["features"], refs["composites"], refs["random"]
        assert truth["recovered_fraction"] == 1.0 and truth["composites_recovered"] == 0.0
        assert truth["absorption"] == 0.0 and truth["absorption_baseline"] == 0.0
        assert truth["absorbing_latents"] == 0.0 and truth["absorbed_parents"] == 0.0
        assert comp["recovered_fraction"] == 0.0 and comp["composites_recovered"] == 1.0
        assert comp["composites_recovered_weighted"] == 1.0  # the bench worlds give parents and children one scale
        assert comp["absorbing_latents"] == 1.0 and comp["absorbed_parents"] == 1.0
        assert comp["absorption"] == 1.0 and comp["absorption_baseline"] == 1.0  # no parent latent at all
        assert rand["recovered_fraction"] == 0.0 and rand["composites_recovered"] == 0.0
        assert rand["absorbing_latents"] == 0.0 and rand["absorbed_parents"] == 0.0
        # a random dictionary's parent "latent" misses as often with the child as without it
        assert abs(rand["absorption"] - rand["absorption_baseline"]) <= 0.1


def test_an_absorbing_latent_reads_the_child_and_a_hedged_parent_reads_the_parent():
    """The same decoder row (closer to parent + child than to either) absorbs when the encoder
    reads the child and hedges when it reads the parent."""
    world = World({"kind": "hierarchy", "d": 8, "nodes": [{"parent": None, "prob": 0.3}, {"parent": 0, "prob": 0.4}]})
    data, u, pairs = held_out(world, 0), world.directions, world.parent_child_pairs()
    row = 0.8 * u[0] + 0.6 * u[1]  # cos 0.99 with the composite, 0.8 with the parent
    absorbing = hand_built(torch.stack([u[0], row]), torch.stack([u[0] - u[1], u[1] / 0.6]).t())
    hedged = hand_built(torch.stack([row, u[1]]), torch.stack([u[0], u[1]]).t())
    assert P.absorbing_latents(absorbing, u, pairs).tolist() == [-1, 0]
    assert P.absorbing_latents(hedged, u, pairs).tolist() == [-1, -1]
    ab = P.absorption(absorbing, data, u, pairs)
    assert ab.absorbing_latent_fraction == 0.5 and ab.absorbed_pair_fraction == 1.0
    assert ab.absorbed_parent_fraction == 0.0  # the parent keeps a latent of its own
    assert ab.absorption_rate == 1.0 and ab.parent_alone_miss_rate == 0.0
    assert P.hedging(hedged, u, pairs).hedging == pytest.approx(0.6, abs=1e-5)
    assert P.absorption(hedged, data, u, pairs).absorbing_latent_fraction == 0.0


def test_weighted_composites_follow_the_magnitudes_in_the_data():
    """A parent written four times as strongly as its child: the dictionary holding unit(4 u_p + u_c)
    is 0.86 from the unit composite, so only the magnitude-weighted composite finds it."""
    world = World({"kind": "hierarchy", "d": 8, "nodes": [{"parent": None, "prob": 0.5}, {"parent": 0, "prob": 0.5}]})
    u, pairs = world.directions, world.parent_child_pairs()
    features = torch.tensor([[4.0, 1.0], [4.0, 0.0], [0.0, 0.0]]).repeat(10, 1)
    x = features @ u
    data = P.Collected(x=x, latents=torch.ones(len(x), 1), features=features, x_hat=x)
    row = (4 * u[0] + u[1]) / math.sqrt(17)
    sae = hand_built(row[None], row[:, None])
    assert P.coactive_magnitudes(data, pairs).tolist() == [[4.0, 1.0]]
    rec = P.composite_recovery(sae, u, pairs, data)
    assert rec.composites_recovered == 0.0 and rec.composites_recovered_weighted == 1.0
    assert rec.mean_matched_cosine == pytest.approx(5 / math.sqrt(34), abs=1e-5)
    assert math.isnan(P.composite_recovery(sae, u, pairs).composites_recovered_weighted)


def test_a_trained_topk_sae_learns_the_composites_not_the_features():
    torch.set_num_threads(1)
    for seed in SEEDS:
        world = World({**SMALL, "seed": seed})
        sae = saelab.train(
            {"architecture": "topk", "d_in": world.d_in, "d_sae": world.n_features, "k": 2, "seed": seed},
            ToySource(world, 256, seed),
            {"steps": 250, "lr": 1e-2, "lr_warmup_steps": 20, "progress": False, "seed": seed},
        ).sae
        r = evaluate(sae, held_out(world, seed), world).as_dict()
        assert r["composites_recovered"] >= 0.75 and r["recovered_fraction"] <= 0.25, (seed, r)
        assert r["absorbed_parents"] >= 0.5 and r["absorbing_latents"] >= 0.5, (seed, r)


def test_composites_need_a_hierarchy():
    world = World({"kind": "independent", "n_features": 4, "d": 8})
    sae = hand_built(world.directions, world.directions.t())
    with pytest.raises(saelab.errors.ConfigError, match="no hierarchy"):
        P.composite_recovery(sae, world.directions, [])
    with pytest.raises(saelab.errors.ConfigError, match="no hierarchy"):
        P.absorbing_latents(sae, world.directions, [])
    with pytest.raises(saelab.errors.ConfigError, match="kind 'independent'"):
        reference_dictionaries(world)
