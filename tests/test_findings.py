"""Published findings reproduced on the default kind of toy world, over several seeds.

Bounds come from 5 seeds measured before the test was written (see the closing note of the
foundation issue): TopK at the true L0 recovered 81-86% of true features (cos >= 0.9), ReLU-L1's
relative reconstruction bias was 0.56-0.57 (default l1_coefficient 3), TopK's and JumpReLU's
0.993-0.999. The bounds
below leave a wide margin for platform differences, while still failing if, e.g., TopK's
selection or the L1 penalty were broken.
"""

import statistics

import pytest
import torch

import saelab
from saelab.evals.summary import evaluate
from saelab.toys import ToySource, World

SEEDS = [0, 1, 2]


def run(arch_cfg: dict, seed: int) -> dict:
    world = World({"n_features": 128, "d": 48, "firing_prob": 0.03, "magnitude_std": 0.2, "seed": seed})
    result = saelab.train(
        {"d_in": 48, "d_sae": 128, "seed": seed, **arch_cfg},
        ToySource(world, 512, seed),
        {"steps": 800, "progress": False, "seed": seed},
    )
    held_out = [world.sample(1024, torch.Generator().manual_seed(10_000 + seed * 10 + i)) for i in range(4)]
    return evaluate(result.sae, held_out, world).as_dict()


@pytest.fixture(scope="module")
def results():
    true_l0 = round(128 * 0.03)
    archs = {
        "topk": {"architecture": "topk", "k": true_l0},
        "relu": {"architecture": "relu"},
        "jumprelu": {"architecture": "jumprelu"},
    }
    return {name: [run(cfg, s) for s in SEEDS] for name, cfg in archs.items()}


@pytest.mark.slow
def test_topk_at_the_true_l0_recovers_most_true_features(results):
    recovered = [r["recovered_fraction"] for r in results["topk"]]
    assert min(recovered) >= 0.7 and statistics.mean(recovered) >= 0.75, recovered
    assert all(r["mmcs_decoder"] >= 0.88 for r in results["topk"])


@pytest.mark.slow
def test_relu_l1_shrinks_while_topk_and_jumprelu_shrink_less(results):
    gamma = {name: [r["shrinkage"] for r in rs] for name, rs in results.items()}
    assert max(gamma["relu"]) < 0.9, gamma
    for name in ("topk", "jumprelu"):
        assert min(gamma[name]) > 0.95, gamma
        for g_other, g_relu in zip(gamma[name], gamma["relu"]):
            assert abs(1 - g_other) < abs(1 - g_relu)
