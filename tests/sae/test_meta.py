"""Meta-SAE: decomposes decoder directions built from shared parts; rejects non-SAEs."""

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.sae.meta import train_meta_sae


def test_meta_latents_recover_the_shared_parts_of_composite_latents():
    torch.manual_seed(0)
    parts = torch.linalg.qr(torch.randn(32, 8))[0].t()  # 8 orthonormal parts in 32-d
    combos = torch.stack([parts[i] + parts[j] for i in range(8) for j in range(i + 1, 8)])  # 28 latents, 2 parts each
    sae = saelab.create({"architecture": "topk", "d_in": 32, "d_sae": 28, "k": 2})
    with torch.no_grad():
        sae.W_dec.copy_(combos / combos.norm(dim=1, keepdim=True))
    res = train_meta_sae(sae, d_meta=8, k=2, steps=400, batch_size=28, train_config={"lr": 3e-3, "lr_warmup_steps": 10})
    assert res.codes.shape == (28, 8) and res.fvu < 0.2
    # each meta-latent's decoder direction lines up with one true part
    cos = torch.nn.functional.normalize(res.meta_sae.W_dec, dim=1) @ parts.t()
    assert (cos.max(1).values > 0.8).float().mean() >= 0.75
    assert all(len(res.meta_latents_of(i)) >= 1 for i in range(28))
    some = next(iter(res.decomposition()))
    assert all(res.codes[i, some] > 0 for i, _ in res.latents_of(some))


@pytest.mark.parametrize("bad", [None, torch.randn(4, 4), "sae", 3])
def test_inputs_that_are_not_an_sae_are_rejected(bad):
    with pytest.raises(ConfigError, match="needs a trained SAE"):
        train_meta_sae(bad)
