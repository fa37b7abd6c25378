"""Published SAE pathologies reproduced on ground-truth toys, with bounds over several seeds.

Absorption (Chanin et al. 2024), measured over seeds 0-6 before writing the bounds (1000 steps;
4000 steps gave the same): the untied L1 SAE absorbed fully on 3/7 seeds (rate 1.0, child
decoder cos with the parent 0.70, child encoder cos -0.03: the encoder/decoder asymmetry); on
the other 4 it found a different optimum whose parent latent carries half the child direction
(hedging 0.5) and nothing is absorbed. The tied SAE absorbed on 1/7 seeds. So "L1 absorbs" holds
on some seeds only and "tying reduces it" holds on average; the bounds say exactly that.
Re-measured on 2026-12-01 (the same before and after latents were matched against parent + child
composites): untied 5/7 seeds absorbed, each with one absorbing latent of four (the child's,
decoding the composite) while the parent keeps a latent of its own; the other 2 hedge (0.48,
0.50); tied 0/7, the absorbing-latent count 0 on every seed.
Wrong L0 (Chanin & Garriga-Alonso 2025), TopK on the bench's correlated world (true L0 5.1):
merged-feature fraction 1.0 at k = 3 vs 0.45-0.61 at k = 5, and the nth decoder projection
(n = d_sae / 8) lowest at k = 5 among k in {3, 5, 12} on 3/3 seeds.
"""

import statistics

import pytest
import torch

import saelab
from saelab.bench.toy import world_spec
from saelab.evals import ground_truth_recovery
from saelab.evals import pathology as P
from saelab.toys.absorption import absorption_toy
from saelab.toys.features import ToySource
from saelab.toys.worlds import World


@pytest.mark.slow
def test_l1_sae_absorbs_the_parent_and_tying_reduces_it():
    torch.set_num_threads(1)
    seeds = range(5)
    untied = [absorption_toy(False, s, steps=1000) for s in seeds]
    tied = [absorption_toy(True, s, steps=1000) for s in seeds]
    rate_u = [r["absorption_rate"] for r in untied]
    rate_t = [r["absorption_rate"] for r in tied]
    absorbing = [r for r in untied if r["absorption_rate"] >= 0.9]
    assert len(absorbing) >= 2, rate_u
    for r in absorbing:
        # the parent latent misses only where the child fires, and the child latent's decoder
        # leans towards the parent while its encoder does not (the asymmetry)
        assert r["parent_alone_miss_rate"] <= 0.05
        assert r["child_decoder_parent_cos"] >= 0.6 and r["child_encoder_parent_cos"] <= 0.1
        # the child latent is the absorbing one; the parent still has a latent of its own
        assert r["absorbed_pair_fraction"] == 1.0 and r["absorbed_parent_fraction"] == 0.0
    # tying removes the asymmetry an absorbing latent needs
    assert statistics.mean(r["absorbing_latent_fraction"] for r in tied) < statistics.mean(
        r["absorbing_latent_fraction"] for r in untied
    )
    # tying encoder to decoder reduces absorption on average
    assert statistics.mean(rate_t) < statistics.mean(rate_u), (rate_u, rate_t)


def _correlated_run(k: int, seed: int) -> dict:
    world = World(world_spec("correlated", quick=False, seed=seed))
    result = saelab.train(
        {"architecture": "topk", "d_in": world.d_in, "d_sae": world.n_features, "k": k, "seed": seed},
        ToySource(world, 512, seed),
        {"steps": 1000, "progress": False, "seed": seed},
    )
    gen = torch.Generator().manual_seed(777 + seed)
    held_out = [world.sample(1024, gen) for _ in range(4)]
    c = P.collect(result.sae, held_out)
    return {
        "merging": P.merging(result.sae, c, world.directions).merged_feature_fraction,
        "nth": P.nth_decoder_projection(result.sae, held_out).value,
        "recovered": ground_truth_recovery(result.sae, world.directions).recovered_fraction,
        "true_l0": world.expected_l0,
    }


@pytest.mark.slow
def test_too_low_l0_merges_correlated_features_and_nth_projection_points_to_true_l0():
    torch.set_num_threads(1)
    seeds = [0, 1, 2]
    true_l0 = World(world_spec("correlated", quick=False, seed=0)).expected_l0
    low, right, high = max(1, round(true_l0 * 0.5)), round(true_l0), round(true_l0 * 2.4)
    runs = {k: [_correlated_run(k, s) for s in seeds] for k in (low, right, high)}
    merge = {k: [r["merging"] for r in rs] for k, rs in runs.items()}
    nth = {k: [r["nth"] for r in rs] for k, rs in runs.items()}
    rec = {k: [r["recovered"] for r in rs] for k, rs in runs.items()}
    # "sparse but wrong": too low an L0 merges features and recovers fewer of them
    assert statistics.mean(merge[low]) >= statistics.mean(merge[right]) + 0.2, merge
    assert all(m_low > m_right for m_low, m_right in zip(merge[low], merge[right])), merge
    assert statistics.mean(rec[low]) <= statistics.mean(rec[right]) - 0.1, rec
    # the nth decoder projection is lowest near the true L0 on every seed
    for i in range(len(seeds)):
        assert nth[right][i] < nth[low][i] and nth[right][i] < nth[high][i], nth
