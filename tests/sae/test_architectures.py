"""Contracts every registered architecture must meet, plus each one's defining behaviour."""

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.sae import StepContext
from saelab.sae.jumprelu import jumprelu, step
from saelab.sae.topk import scatter_topk
from tests.conftest import small_config


def perturbed(arch: str, **extra):
    sae = saelab.create(small_config(arch, **extra))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def test_decode_of_encode_is_forward(arch):
    sae = perturbed(arch).eval()
    x = torch.randn(64, 12)
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae(x), rtol=0, atol=0)


def test_orientation_follows_saelens(arch):
    sae = saelab.create(small_config(arch))
    assert sae.W_enc.shape == (12, 32) and sae.W_dec.shape == (32, 12)
    assert sae.b_dec.shape == (12,)


def test_loss_terms_present_finite_and_gradient_reaches_every_parameter(arch):
    sae = perturbed(arch)
    x = 3 * torch.randn(512, 12)
    ctx = StepContext(sparsity_scale=1.0, dead_mask=torch.ones(32, dtype=torch.bool))
    out = sae.loss_terms(x, ctx)
    trainable = any(p.requires_grad for p in sae.parameters())
    # Gradient-trained SAEs have a sparsity or auxiliary term; fitted baselines (PCA, ...) report what they minimised.
    assert "mse" in out.losses and (len(out.losses) >= 2 or not trainable)
    for name, value in out.losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    if not trainable:
        return
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_unit_norm_decoder_is_kept_and_parallel_gradient_removed():
    sae = perturbed("topk")
    out = sae.loss_terms(torch.randn(64, 12), StepContext())
    out.loss.backward()
    sae.before_optimizer_step()
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert (sae.W_dec.grad * w).sum(1).abs().max() < 1e-5
    torch.optim.SGD(sae.parameters(), lr=0.5).step()
    sae.after_optimizer_step(out)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_relu_penalty_mode_weights_l1_by_decoder_norm():
    sae = perturbed("relu", decoder_norm="penalty", l1_coefficient=2.0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 32)[:, None])
    x = torch.randn(32, 12)
    out = sae.loss_terms(x, StepContext(sparsity_scale=0.5))
    f = sae.encode(x)
    expected = 2.0 * 0.5 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.losses["l1"], expected)
    unit = perturbed("relu", decoder_norm="unit", l1_coefficient=2.0)
    out = unit.loss_terms(x, StepContext())
    torch.testing.assert_close(out.losses["l1"], 2.0 * unit.encode(x).sum(-1).mean())


def test_topk_has_exactly_k_active_and_relu_after_selection():
    sae = perturbed("topk", k=5)
    f = sae.encode(torch.randn(200, 12))
    assert ((f != 0).sum(1) <= 5).all() and (f >= 0).all()
    pre = sae.pre_acts(torch.randn(200, 12))
    kth = pre.topk(5, dim=1).values[:, -1:]
    g = sae.activation(pre)
    assert torch.equal(g != 0, (pre >= kth) & (pre > 0))


def test_batchtopk_keeps_batch_times_k_in_training_and_threshold_at_inference():
    sae = perturbed("batchtopk", k=4)
    x = torch.randn(128, 12)
    sae.train()
    f = sae.encode(x)
    assert int((f != 0).sum()) == 128 * 4
    per_row = (f != 0).sum(1)
    assert per_row.min() < per_row.max()  # the per-sample L0 varies, only the batch mean is fixed
    out = sae.loss_terms(x, StepContext())
    sae.after_optimizer_step(out)
    theta = float(sae.threshold)
    kept = out.dense_feature_acts()
    assert theta == pytest.approx(float(kept[kept > 0].min()))
    sae.eval()
    pre = sae.pre_acts(x)
    assert torch.equal(sae.encode(x), pre * (pre > theta))


def test_gated_magnitude_path_is_gate_path_rescaled():
    sae = perturbed("gated")
    x = torch.randn(100, 12)
    pi_gate, pi_mag = sae._paths(x)
    xc = x - sae.b_dec
    torch.testing.assert_close(pi_mag - sae.b_mag, (xc @ sae.W_enc) * sae.r_mag.exp())
    out = sae.loss_terms(x, StepContext())
    out.losses["aux"].backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().sum() == 0  # aux uses a frozen decoder
    assert sae.W_enc.grad.abs().sum() > 0


def test_jumprelu_pseudo_derivatives_follow_the_rectangle_kernel():
    eps = 0.1
    z = torch.tensor([0.30, 0.36, 0.44, 0.46, 0.60, 0.2])
    theta = torch.full((6,), 0.4, requires_grad=True)
    jumprelu(z, theta, eps).sum().backward()
    in_window = ((z - 0.4).abs() <= eps / 2).float()
    torch.testing.assert_close(theta.grad, -(0.4 / eps) * in_window)
    theta.grad = None
    step(z, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, -(1 / eps) * in_window)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 17}, "k"),
        ({"architecture": "relu", "d_in": 8, "d_sae": 16, "l1_coefficient": -1.0}, "l1_coefficient"),
        ({"architecture": "jumprelu", "d_in": 8, "d_sae": 16, "bandwidth": 0}, "bandwidth"),
        ({"architecture": "relu", "d_in": 0, "d_sae": 16}, "d_in"),
        ({"architecture": "relu", "d_in": 8, "d_sae": 16, "l1_coeficient": 1.0}, "l1_coeficient"),
    ],
)
def test_impossible_settings_fail_with_the_field_named(bad, field):
    with pytest.raises(ConfigError, match=field):
        saelab.create(bad)


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        saelab.create({"architecture": "relu2", "d_in": 8, "d_sae": 16})
    for name in saelab.list_architectures():
        assert name in str(err.value)


def test_wrong_input_width_is_a_clear_error(arch):
    sae = saelab.create(small_config(arch))
    with pytest.raises(ConfigError, match="d_in=12"):
        sae.encode(torch.randn(3, 13))


def test_fold_input_scale_makes_the_sae_take_raw_inputs(arch):
    sae = perturbed(arch).eval()
    x = torch.randn(50, 12)
    s = 2.5
    f_scaled, x_hat_scaled = sae.encode(x * s), sae(x * s)
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), f_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), x_hat_scaled / s, rtol=1e-5, atol=1e-5)


def test_auxk_is_scaled_down_when_few_latents_are_dead():
    sae = perturbed("topk", k=4, k_aux=8)
    x = torch.randn(256, 12)
    dead_one = torch.zeros(32, dtype=torch.bool)
    dead_one[5] = True
    dead_all = torch.ones(32, dtype=torch.bool)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        x_hat = sae.decode(sae.activation(pre))
        residual = x - x_hat
        f_aux = torch.zeros_like(pre)
        f_aux[:, 5] = torch.relu(pre[:, 5])  # the one dead latent is the whole aux code
        expected = sae.cfg.aux_coefficient * (1 / 8) * (f_aux @ sae.W_dec - residual).pow(2).sum(-1).mean()
        got = sae.loss_terms(x, StepContext(dead_mask=dead_one)).losses["auxk"]
        torch.testing.assert_close(got, expected)
        assert sae.loss_terms(x, StepContext(dead_mask=dead_all)).losses["auxk"] > 0
        assert sae.loss_terms(x, StepContext(dead_mask=torch.zeros(32, dtype=torch.bool))).losses["auxk"] == 0


def _dense_topk_reference(sae, x, ctx):
    """The same losses computed the plain way: dense latents, dense decoder matmuls."""
    from saelab.sae.base import mse_per_token

    pre = sae.pre_acts(x)
    f = scatter_topk(pre, sae.cfg.k)
    x_hat = f @ sae.W_dec + sae.b_dec
    loss = mse_per_token(x_hat, x)
    dead = ctx.dead_mask
    if dead is not None and dead.any():
        k_aux = min(sae.cfg.effective_k_aux, int(dead.sum()))
        f_aux = scatter_topk(pre.masked_fill(~dead, float("-inf")), k_aux).nan_to_num(0.0)
        scale = min(int(dead.sum()) / sae.cfg.effective_k_aux, 1.0)
        loss = loss + sae.cfg.aux_coefficient * scale * mse_per_token(f_aux @ sae.W_dec, (x - x_hat).detach())
    return loss


@pytest.mark.parametrize("k", [1, 4, 32])  # 32 = d_sae
@pytest.mark.parametrize("ties", [False, True])
def test_sparse_topk_training_path_equals_the_dense_reference(k, ties):
    x = torch.randn(64, 12)
    if ties:
        x[:8] = x[0]  # identical rows give identical pre-activations, so equal values compete
    x[-1] = 0.0  # an all-zero row
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for path in ("sparse", "dense"):
        torch.manual_seed(1)
        sae = perturbed("topk", k=k, k_aux=6)
        ctx = StepContext(dead_mask=dead)
        loss = sae.loss_terms(x, ctx).loss if path == "sparse" else _dense_topk_reference(sae, x, ctx)
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (loss_s, g_s), (loss_d, g_d) = grads
    assert loss_s == pytest.approx(loss_d, rel=1e-5)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
