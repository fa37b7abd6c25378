import pytest
import torch

import saelab
from saelab.activations.factory import build_source
from saelab.errors import ConfigError
from saelab.models import ModelSource, hooks
from saelab.models.text import TokenRows, keep_mask, load_texts, special_ids


def _source(model, tokenizer, texts, **kw):
    args = dict(context_size=16, batch_size=32, buffer_tokens=256, model_batch_size=4, seed=0)
    args.update(kw)
    return ModelSource(
        model,
        tokenizer,
        texts,
        kw.pop("hookpoint", "transformer.h.0"),
        **{k: v for k, v in args.items() if k != "hookpoint"},
    )


def _unshuffled(model, tokenizer, texts, hookpoint="transformer.h.0"):
    """Every kept activation and token, in document order, straight from the hooks."""
    rows = TokenRows(load_texts(texts), tokenizer, context_size=16)
    xs, toks = [], []
    hp = hooks.resolve(model, hookpoint)
    while (b := rows.next_rows(4)) is not None:
        ids, mask = b
        a = hooks.run(model, ids, hp, mask)[hp[0].name]
        keep = keep_mask(ids, mask, special_ids(tokenizer))
        xs.append(a[keep])
        toks.append(ids[keep])
    return torch.cat(xs), torch.cat(toks)


def test_buffer_is_a_shuffle_of_the_harvest_without_special_tokens(gpt2, tokenizer, texts):
    x_ref, t_ref = _unshuffled(gpt2, tokenizer, texts)
    src = _source(gpt2, tokenizer, texts, buffer_tokens=10_000)  # one block holds everything
    batches = list(src)
    x = torch.cat([b.x for b in batches])
    t = torch.cat([b.tokens for b in batches])
    assert src.d_in == 64 and x.shape[1] == 64
    assert len(x) == len(x_ref) // 32 * 32  # only the short tail is dropped
    specials = set(special_ids(tokenizer).tolist())
    assert not specials & set(t.tolist())
    # each batch row is one of the harvested (activation, token) pairs
    key = {(tok, round(float(v), 4)) for tok, v in zip(t_ref.tolist(), x_ref[:, 0].tolist())}
    assert all((tok, round(float(v), 4)) in key for tok, v in zip(t.tolist(), x[:, 0].tolist()))
    # and the order is shuffled: consecutive positions of a document are not consecutive rows
    assert not torch.equal(t, t_ref[: len(t)])


def test_exact_resume_across_blocks(gpt2, tokenizer, texts):
    texts = texts[:6]  # small, so the 17 batches below wrap around the data
    src = _source(gpt2, tokenizer, texts, repeat=True)
    for _ in range(5):
        next(src)
    state = src.state_dict()
    ref = [next(src) for _ in range(12)]  # crosses several 256-token blocks and an epoch
    other = _source(gpt2, tokenizer, texts, repeat=True)
    other.load_state_dict(state)
    again = [next(other) for _ in range(12)]
    assert all(torch.equal(a.x, b.x) and torch.equal(a.tokens, b.tokens) for a, b in zip(ref, again))
    assert src.rows.epoch >= 1


def test_target_hookpoint_gives_transcoder_pairs(llama, tokenizer, texts):
    src = ModelSource(
        llama,
        tokenizer,
        texts,
        "model.layers.0.mlp:input",
        target_hookpoint="model.layers.0.mlp",
        context_size=16,
        batch_size=16,
        buffer_tokens=64,
    )
    b = next(src)
    assert b.x.shape == b.target.shape == (16, 64)
    with torch.no_grad():
        assert torch.allclose(llama.model.layers[0].mlp(b.x), b.target, atol=1e-5)


def test_train_from_a_saved_model_folder(tmp_path, gpt2, tokenizer, texts):
    gpt2.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    spec = {
        "type": "model",
        "model": str(tmp_path / "m"),
        "hookpoint": "transformer.h.1",
        "data": {"texts": texts},
        "context_size": 16,
        "batch_size": 32,
        "buffer_tokens": 256,
        "repeat": True,
    }
    src = build_source(spec)
    result = saelab.train(
        {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 8},
        src,
        {"steps": 30, "progress": False, "lr_warmup_steps": 5, "norm_estimation_batches": 2},
    )
    assert result.tokens == 30 * 32
    with pytest.raises(ConfigError, match=r"d_in=64 but the SAE has d_in=32"):
        saelab.train({"architecture": "topk", "d_in": 32, "d_sae": 64, "k": 4}, build_source(spec), {"steps": 1})
    with pytest.raises(ConfigError, match=r"near matches: transformer\.h\.1"):
        build_source({**spec, "hookpoint": "transformer.h1"})
    with pytest.raises(ConfigError, match="not available offline"):
        build_source({**spec, "model": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="unknown key"):
        build_source({**spec, "hookpiont": "x"})
    with pytest.raises(ConfigError, match=r"context_size=65 exceeds the 64 positions"):
        build_source({**spec, "context_size": 65})
