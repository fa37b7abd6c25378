"""Patchscope mechanics on tiny models: the patch sits at the placeholder in every forward of the
generation, and an identity prompt reads back a token from its own hidden state."""

import random

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.models import hooks
from saelab.reading.patchscope import (
    choose_scale,
    patched_generate,
    patchscope_latents,
    placeholder_position,
    report_markdown,
)
from tests.models import tiny

WORDS = tiny.WORDS


@pytest.fixture(scope="module")
def arrow_tokenizer():
    """Word-level tokenizer with '->', ';' and '?' for identity prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tiny.SPECIALS + WORDS + ["->", ";", "?"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def identity_model(arrow_tokenizer):
    """A tiny Llama trained on 'w -> w ; v -> v ; ...' so that it copies the token before '->'."""
    torch.set_num_threads(1)
    model = _llama(len(arrow_tokenizer)).train()
    rng = random.Random(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        rows = [" ; ".join(f"{w} -> {w}" for w in rng.sample(WORDS, 4)) for _ in range(32)]
        ids = torch.tensor([arrow_tokenizer(r)["input_ids"] for r in rows])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_placeholder_position_finds_the_last_placeholder(arrow_tokenizer):
    ids, pos = placeholder_position(arrow_tokenizer, "cat -> cat ; ? ->")
    assert arrow_tokenizer.decode([ids[pos]]) == "?" and pos == len(ids) - 2
    with pytest.raises(ConfigError, match="no placeholder"):
        placeholder_position(arrow_tokenizer, "cat -> cat")
    with pytest.raises(ConfigError, match="first token"):
        placeholder_position(arrow_tokenizer, "? -> cat")


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_the_patch_is_held_at_the_placeholder_in_every_forward(llama, tokenizer, mode):
    ids = tokenizer("the red cat sat on the mat")["input_ids"]
    pos, steps = 3, 4
    vectors = torch.randn(2, 64) * 5
    seen = []
    handle = llama.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        out = patched_generate(llama, ids, "model.layers.0", vectors, pos, max_new_tokens=steps, mode=mode)
    finally:
        handle.remove()
    assert len(seen) == steps  # one full forward per generated token (no KV cache)
    for step, h in enumerate(seen):
        assert h.shape[:2] == (2, len(ids) + step)
        seq = torch.cat([torch.tensor([ids] * 2), out["generated"][:, :step]], dim=1)
        clean = hooks.run(llama, seq, hooks.resolve(llama, "model.layers.0"))["model.layers.0"]
        expected = vectors if mode == "replace" else clean[:, pos] + vectors
        assert torch.allclose(h[:, pos], expected, atol=1e-5)
        others = torch.ones(h.shape[1], dtype=torch.bool)
        others[pos] = False
        assert torch.allclose(h[:, others], clean[:, others], atol=1e-5)  # only the placeholder row is replaced


@pytest.mark.slow
def test_identity_prompt_reads_back_a_token_from_its_own_hidden_state(identity_model, arrow_tokenizer):
    hp = "model.embed_tokens"
    ids, pos = placeholder_position(arrow_tokenizer, "red -> red ; owl -> owl ; ? ->")
    vectors = []
    for w in WORDS:  # the token's hidden state, taken from another prompt
        src = arrow_tokenizer(f"cat -> cat ; {w}")["input_ids"]
        vectors.append(hooks.run(identity_model, torch.tensor([src]), hooks.resolve(identity_model, hp))[hp][0, -1])
    out = patched_generate(identity_model, ids, hp, torch.stack(vectors), pos, max_new_tokens=2)
    said = [arrow_tokenizer.decode(row[:1]) for row in out["generated"].tolist()]
    assert sum(a == b for a, b in zip(said, WORDS)) >= 0.9 * len(WORDS)


def test_choose_scale_rule():
    # self-similarity too low at the first scale; the lowest entropy in the band wins, ties to the smaller scale
    assert choose_scale([0.1, 0.5, 0.8, 0.9], [0.1, 2.0, 1.0, 1.0]) == 2
    assert choose_scale([0.0, 0.0], [3.0, 1.0]) == 1


def test_patchscope_latents_sweeps_and_reports(llama, tokenizer):
    sae = saelab.create({"architecture": "topk", "d_in": 64, "d_sae": 16, "k": 4, "seed": 0})
    res = patchscope_latents(
        sae,
        llama,
        tokenizer,
        [1, 5],
        hookpoint="model.layers.0",
        prompt="cat sat on the mat and the dog sat on the ?",
        placeholder="?",
        scales=(0.5, 2.0, 8.0),
        max_new_tokens=3,
        progress=False,
    )
    assert res["placeholder_position"] > 0 and [r["latent"] for r in res["latents"]] == [1, 5]
    for r in res["latents"]:
        sims = [s["self_similarity"] for s in r["sweep"]]
        ents = [s["entropy"] for s in r["sweep"]]
        assert r["chosen"] == r["sweep"][choose_scale(sims, ents)]
        assert [s["scale"] for s in r["sweep"]] == [0.5, 2.0, 8.0]
        assert all(-1 <= s <= 1 for s in sims) and all(e >= 0 for e in ents)
        assert sims[-1] > sims[0]  # a larger push leaves more of the direction in the final residual
    assert "| 1 |" in report_markdown(res)
    with pytest.raises(ConfigError, match="out of range"):
        patchscope_latents(sae, llama, tokenizer, [99], hookpoint="model.layers.0", prompt="a b ?", progress=False)
