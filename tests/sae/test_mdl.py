"""MDL: the description-length loss terms and the evaluator that ranks SAEs under a bound."""

import math

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.evals.mdl import description_length, quantise, rank_by_description_length
from saelab.sae import StepContext
from saelab.sae.mdl import binary_entropy_bits


def test_loss_is_entropy_of_firing_plus_value_bits():
    sae = saelab.create({"architecture": "mdl", "d_in": 12, "d_sae": 32, "dl_coefficient": 1.0, "value_bits": 4})
    x = 3 * torch.randn(256, 12)
    out = sae.loss_terms(x, StepContext())
    fires = (sae.pre_acts(x) > sae.threshold).float()
    torch.testing.assert_close(out.losses["dl_positions"], binary_entropy_bits(fires.mean(0)).sum())
    torch.testing.assert_close(out.losses["dl_values"], 4 * fires.sum(-1).mean())


def test_quantise_keeps_zeros_and_uses_at_most_2_to_the_b_levels():
    f = torch.relu(torch.randn(500, 3))
    q = quantise(f, 2)
    assert torch.equal(q == 0, f == 0)
    for j in range(3):
        assert q[:, j][q[:, j] != 0].unique().numel() <= 4


def test_evaluator_ranks_a_good_sae_above_a_bad_one_and_marks_the_bound():
    w = torch.eye(8)
    batches = [torch.relu(torch.randn(256, 8)) * (torch.rand(256, 8) < 0.2)]
    good = saelab.create({"architecture": "relu", "d_in": 8, "d_sae": 8, "apply_b_dec_to_input": False})
    bad = saelab.create({"architecture": "topk", "d_in": 8, "d_sae": 8, "k": 1})
    with torch.no_grad():
        good.W_enc.copy_(w), good.W_dec.copy_(w), good.b_dec.zero_()
    ranked = rank_by_description_length({"bad": bad, "good": good}, batches, max_fvu=0.05)
    assert ranked[0][0] == "good" and ranked[0][1].within_bound
    assert ranked[1][1].bits_per_token == math.inf and not ranked[1][1].within_bound
    dl = description_length(good, batches, max_fvu=0.05)
    assert dl.bits_per_token == pytest.approx(dl.position_bits + dl.l0 * dl.precision_bits)
    with pytest.raises(ConfigError, match="max_fvu"):
        description_length(good, batches, max_fvu=2.0)


def test_an_l0_coefficient_on_mdl_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="l0_coefficient"):
        saelab.create({"architecture": "mdl", "d_in": 8, "d_sae": 16, "l0_coefficient": 1.0})
