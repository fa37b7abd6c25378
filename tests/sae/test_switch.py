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


def test_balance_and_z_losses_are_on_the_reconstruction_scale_and_router_gets_gradient():
    sae = make(load_balance_coefficient=1.0, router_z_coefficient=0.5)
    x = torch.randn(512, 12)
    out = sae.loss_terms(x, StepContext())
    probs = sae.router_probs(x)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / 512
    # x d_in: the MSE is summed over d_in on inputs with E||x||^2 ~ d_in
    torch.testing.assert_close(out.losses["load_balance"], 12 * 4 * (frac * probs.mean(0)).sum())
    z = torch.logsumexp(sae.router_logits(x), -1).pow(2).mean()
    torch.testing.assert_close(out.losses["router_z"], 12 * 0.5 * z)
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


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routing_stays_balanced_and_follows_clusters(seed):
    """Four clusters (a large shared offset each, plus sparse features): the default balance and
    z-loss keep every expert in use (busiest at most 2/N of tokens, where a collapsed router sends
    all of them to one) and each cluster goes mostly to one expert."""
    gen = torch.Generator().manual_seed(seed)
    d, n_feat = 16, 32
    centres = 3.0 * torch.nn.functional.normalize(torch.randn(4, d, generator=gen), dim=1)
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=gen), dim=1)

    def batch(n=256):
        c = torch.randint(4, (n,), generator=gen)
        f = (torch.rand(n, n_feat, generator=gen) < 0.08).float()
        return c, centres[c] + f @ dirs

    data = [batch()[1] for _ in range(600)]
    cfg = {"architecture": "switch", "d_in": d, "d_sae": 64, "k": 3, "n_experts": 4, "seed": seed}
    result = saelab.train(cfg, data, {"steps": 600, "progress": False, "seed": seed})
    c, x = batch(4096)
    util = result.sae.expert_utilisation(x)
    assert float(util.max()) <= 2 / 4, util
    expert = result.sae.router_probs(x).argmax(-1)
    purity = sum(float(torch.bincount(expert[c == i], minlength=4).max()) for i in range(4)) / len(c)
    assert purity > 0.6, purity  # a router blind to the clusters, balanced, gets about 0.25-0.4
