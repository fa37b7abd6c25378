"""Matryoshka: nested prefixes each reconstruct x, per-level weights, random prefixes, bad prefixes."""

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.sae import StepContext
from saelab.sae.base import mse_per_token


def make(**extra):
    return saelab.create({"architecture": "matryoshka", "d_in": 12, "d_sae": 32, "k": 4, **extra})


def test_each_prefix_loss_is_the_reconstruction_from_that_prefix_alone():
    sae = make(prefixes=[4, 12, 32], level_weights=[0.5, 0.3, 0.2])
    x = torch.randn(64, 12)
    out = sae.loss_terms(x, StepContext())
    f = out.dense_feature_acts()
    for m, w, key in [(4, 0.5, "mse_prefix_4"), (12, 0.3, "mse_prefix_12"), (32, 0.2, "mse")]:
        x_hat = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        torch.testing.assert_close(out.losses[key], w * mse_per_token(x_hat, x))
    assert int((f != 0).sum()) == 64 * 4  # BatchTopK: B*k active in the batch


def test_early_latents_get_gradient_from_every_level_late_ones_only_from_the_full_level():
    sae = make(prefixes=[8, 32], level_weights=[1.0, 0.0])
    x = torch.randn(128, 12)
    out = sae.loss_terms(x, StepContext())
    (out.losses["mse_prefix_8"]).backward()
    assert sae.W_dec.grad[8:].abs().sum() == 0 and sae.W_dec.grad[:8].abs().sum() > 0


def test_random_prefixes_end_at_d_sae_and_are_increasing():
    sae = make(random_prefixes=True, n_random_prefixes=5)
    torch.manual_seed(1)
    draws = [sae.sample_prefixes() for _ in range(20)]
    for p in draws:
        assert p[-1] == 32 and all(b > a for a, b in zip(p, p[1:])) and len(p) == 5
    assert len({tuple(p) for p in draws}) > 1
    out = sae.loss_terms(torch.randn(32, 12), StepContext())
    assert {"mse", "mse_level_0", "auxk"} <= set(out.losses)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"prefixes": [8, 4, 32]}, "prefixes must be strictly increasing"),
        ({"prefixes": [8, 16]}, "prefixes must end at d_sae=32"),
        ({"prefixes": [8, 32], "level_weights": [1.0]}, "level_weights"),
    ],
)
def test_bad_prefixes_name_the_field_and_the_fix(extra, match):
    with pytest.raises(ConfigError, match=match):
        make(**extra)
