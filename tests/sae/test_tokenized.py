"""Tokenized SAE: per-token bias added at decode, initialised from per-token means, bad ids."""

import pytest
import torch

import saelab
from saelab.activations.base import Batch
from saelab.activations.factory import build_source
from saelab.errors import ConfigError
from saelab.sae import StepContext


def make(**extra):
    return saelab.create({"architecture": "tokenized", "d_in": 12, "d_sae": 32, "k": 4, "vocab_size": 10, **extra})


def test_decode_adds_the_row_of_each_token():
    sae = make()
    with torch.no_grad():
        sae.W_lookup.copy_(torch.randn(11, 12))
    x, t = torch.randn(6, 12), torch.tensor([0, 3, 3, 9, 1, 0])
    f = sae.encode(x)
    torch.testing.assert_close(sae.decode(f, t), f @ sae.W_dec + sae.b_dec + sae.W_lookup[t])
    torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec + sae.W_lookup[10])  # no ids: fallback row


def test_init_from_data_recovers_the_known_per_token_means():
    src = build_source(
        {
            "type": "toy_tokens",
            "world": {"n_features": 40, "d": 12, "firing_prob": 0.05},
            "vocab_size": 10,
            "mean_norm": 2.0,
            "zipf_exponent": 0.0,
            "batch_size": 4000,
        }
    )
    b = next(src)
    sae = make()
    sae.init_from_data(Batch(x=b.x, tokens=b.tokens))
    world_mean = (b.x - src.token_means[b.tokens]).mean(0)
    est = sae.W_lookup[:10] + sae.b_dec - world_mean
    cos = torch.nn.functional.cosine_similarity(est, src.token_means, dim=1)
    assert cos.min() > 0.95


def test_training_uses_the_batch_token_ids():
    sae = make()
    x, t = torch.randn(64, 12), torch.randint(0, 10, (64,))
    out = sae.loss_terms(x, StepContext(batch=Batch(x=x, tokens=t)))
    out.loss.backward()
    assert sae.W_lookup.grad[10].abs().sum() == 0 and sae.W_lookup.grad[t].abs().sum() > 0


def test_token_id_outside_the_table_is_a_clear_error():
    sae = make()
    with pytest.raises(ConfigError, match="vocab_size=10"):
        sae.decode(torch.zeros(2, 32), torch.tensor([3, 10]))
