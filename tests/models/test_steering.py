import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.models.steering import generate, steer


def _ids(tokenizer, texts):
    return torch.tensor([tokenizer(texts[0], add_special_tokens=False)["input_ids"][:10]])


def _sae(d_in=64, seed=0):
    return saelab.create({"architecture": "topk", "d_in": d_in, "d_sae": 32, "k": 4, "seed": seed})


def test_adding_a_direction_before_the_unembedding_moves_logits_along_w_u_d(gpt2, tokenizer, texts):
    ids, sae = _ids(tokenizer, texts), _sae()
    with torch.no_grad():
        clean = gpt2(ids).logits
        with steer(gpt2, "transformer.ln_f", sae, 5, scale=3.0):
            steered = gpt2(ids).logits
    predicted = 3.0 * (gpt2.lm_head.weight @ sae.W_dec[5].detach())
    assert torch.allclose(steered - clean, predicted.expand_as(clean), atol=1e-4)


@pytest.mark.parametrize("family,hookpoint", [("gpt2", "transformer.h.1"), ("llama", "model.layers.1")])
def test_steering_upstream_of_the_final_norm_promotes_the_predicted_tokens(
    family, hookpoint, request, tokenizer, texts
):
    model, ids, sae = request.getfixturevalue(family), _ids(tokenizer, texts), _sae()
    unembed = model.get_output_embeddings().weight
    for latent in range(4):
        with torch.no_grad():
            clean = model(ids).logits[0, -1]
            with steer(model, hookpoint, sae, latent, scale=20.0):
                steered = model(ids).logits[0, -1]
        predicted = unembed @ sae.W_dec[latent].detach()
        change = steered - clean
        cos = torch.nn.functional.cosine_similarity(change - change.mean(), predicted - predicted.mean(), dim=0)
        assert cos > 0.5
        assert predicted.argmax() == steered.argmax()  # a large push makes the promoted token the top one


def test_clamp_sets_the_latent(gpt2, tokenizer, texts):
    ids, sae = _ids(tokenizer, texts), _sae()
    seen = {}
    h = gpt2.transformer.h[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad(), steer(gpt2, "transformer.h.0", sae, 7, scale=5.0, mode="clamp"):
            gpt2(ids)
    finally:
        h.remove()
    from saelab.models import hooks

    clean = hooks.run(gpt2, ids, hooks.resolve(gpt2, "transformer.h.0"))["transformer.h.0"][0]
    f_clean = sae.encode(clean)[:, 7].detach()
    # only latent 7's contribution changed: by (5 - f) along its decoder direction, error term kept
    expected = clean + (5.0 - f_clean)[:, None] * sae.W_dec[7].detach()
    assert torch.allclose(seen["x"][0], expected, atol=1e-5)


def test_generation_changes_and_bad_latent(gpt2, tokenizer):
    sae = _sae()
    out = generate(gpt2, tokenizer, "the red cat", "transformer.ln_f", sae, 3, scale=1000.0, max_new_tokens=5)
    target = tokenizer.decode([int((gpt2.lm_head.weight @ sae.W_dec[3].detach()).argmax())])
    assert out["steered"].split() == [target] * 5 and out["plain"] != out["steered"]
    with pytest.raises(ConfigError, match="out of range"):
        with steer(gpt2, "transformer.h.0", sae, 99, scale=1.0):
            pass
