"""Switch SAE: one expert per token, scaled by its router probability; balance loss; FLOPs; bad widths."""

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.sae import StepContext


def make(**extra):
    return saelab.create({"architecture": "switch", "d_in": 12, "d_sae": 32, "k": 3, "n_experts": 4, **extra})


def test_each_token_uses_only_its_argmax_expert_and_is_scaled_by_its_probability():
    sae = make().eval()
    x = torch.randn(100, 12)
    f = sae.encode(x)
    probs = sae.router_probs(x)
    expert = probs.argmax(-1)
    blocks = (f != 0).view(100, 4, 8).any(-1)
    assert (blocks.sum(-1) <= 1).all() and torch.equal(
        blocks.float().argmax(-1)[blocks.any(-1)], expert[blocks.any(-1)]
    )
    assert ((f != 0).sum(-1) <= 3).all()
    # same codes as a TopK of the chosen expert, times p_e*
    xc = x - sae.b_dec
    for i in range(5):
        e = int(expert[i])
        pre = xc[i] @ sae.W_enc[:, e * 8 : (e + 1) * 8] + sae.b_enc[e * 8 : (e + 1) * 8]
        top = pre.topk(3)
        expected = torch.zeros(8).scatter(0, top.indices, torch.relu(top.values)) * probs[i, e]
        torch.testing.assert_close(f[i, e * 8 : (e + 1) * 8], expected)


def test_load_balance_is_alpha_when_balanced_and_router_gets_gradient():
    sae = make(load_balance_coefficient=1.0)
    x = torch.randn(512, 12)
    out = sae.loss_terms(x, StepContext())
    probs = sae.router_probs(x)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / 512
    torch.testing.assert_close(out.losses["load_balance"], 4 * (frac * probs.mean(0)).sum())
    out.losses["mse"].backward()
    assert sae.W_router.grad.abs().sum() > 0


def test_flops_per_token_scale_with_expert_size_not_total_width():
    small = make().flops_per_token()
    wide = saelab.create(
        {"architecture": "switch", "d_in": 12, "d_sae": 128, "k": 3, "n_experts": 16}
    ).flops_per_token()
    assert wide["encoder"] == small["encoder"] and wide["dense_topk_encoder"] == 4 * small["dense_topk_encoder"]
    util = make().expert_utilisation(torch.randn(300, 12))
    assert util.shape == (4,) and float(util.sum()) == pytest.approx(1.0)


def test_expert_count_must_divide_the_width():
    with pytest.raises(ConfigError, match="n_experts=5 does not divide d_sae=32"):
        make(n_experts=5)
    with pytest.raises(ConfigError, match="expert width"):
        make(k=9)
