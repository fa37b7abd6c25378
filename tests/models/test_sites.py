"""Sources that yield several named sites per batch: several hookpoints of one model, and the same
tokens through several models (sites keyed `alias/hookpoint`)."""

import pytest
import torch

from saelab.activations.factory import build_source, held_out, parse_source
from saelab.errors import ConfigError
from saelab.models import ModelSource, hooks
from saelab.models.text import TokenRows, keep_mask, load_texts, special_ids
from tests.models import tiny

LLAMA_SITES = ["model.layers.0.mlp:input", "model.layers.1.mlp:input", "model.layers.1"]


def _direct(model, tokenizer, texts, hookpoints, context_size=16):
    """Every kept position's activations at `hookpoints` and its token, in document order, from hooks.run."""
    rows = TokenRows(load_texts(texts), tokenizer, context_size=context_size)
    hps = hooks.resolve(model, hookpoints)
    out: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in hps} | {"tokens": []}
    while (b := rows.next_rows(4)) is not None:
        ids, mask = b
        acts = hooks.run(model, ids, hps, mask)
        keep = keep_mask(ids, mask, special_ids(tokenizer))
        for hp in hps:
            out[hp.name].append(acts[hp.name][keep])
        out["tokens"].append(ids[keep])
    return {k: torch.cat(v) for k, v in out.items()}


def _rows_of(batch, site, ref):
    """For each row of `batch`, the index of the harvested position with the same activation at `site`."""
    return torch.cdist(batch.sites[site], ref).argmin(dim=1)


def _saved(tmp_path, name, model, tokenizer):
    model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def _spec(**kw):
    spec = {
        "type": "model",
        "data": {"texts": tiny.make_texts()},
        "context_size": 16,
        "batch_size": 16,
        "buffer_tokens": 128,
    }
    spec.update(kw)
    return spec


def test_several_hookpoints_one_forward_equal_a_direct_capture(llama, tokenizer, texts):
    src = ModelSource(
        llama,
        tokenizer,
        texts,
        hookpoints=["model.layers.*.mlp:input", "model.layers.1"],
        context_size=16,
        batch_size=16,
        buffer_tokens=64,
        model_batch_size=4,
    )
    assert src.site_names == LLAMA_SITES and src.site_widths == dict.fromkeys(LLAMA_SITES, 64)
    assert src.d_in == 64 and src.x_site == LLAMA_SITES[0]
    ref = _direct(llama, tokenizer, texts, LLAMA_SITES)
    for _ in range(5):  # crosses several buffer blocks
        b = next(src)
        assert list(b.sites) == LLAMA_SITES and b.x is b.sites[LLAMA_SITES[0]] and b.target is b.x
        k = _rows_of(b, LLAMA_SITES[0], ref[LLAMA_SITES[0]])
        assert torch.equal(b.tokens, ref["tokens"][k])  # every site of a row comes from one token
        for site in LLAMA_SITES:
            assert torch.allclose(b.sites[site], ref[site][k], atol=1e-5)
        assert torch.equal(b.view("model.layers.1.mlp:input").x, b.sites["model.layers.1.mlp:input"])


def test_single_hookpoint_and_target_stay_as_before_and_name_their_sites(llama, tokenizer, texts):
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
    assert src.d_in == src.d_out == 64 and src.hookpoint.name == "model.layers.0.mlp:input"
    assert list(b.sites) == ["model.layers.0.mlp:input", "model.layers.0.mlp"]
    assert b.x is b.sites["model.layers.0.mlp:input"] and b.target is b.sites["model.layers.0.mlp"]
    with torch.no_grad():
        assert torch.allclose(llama.model.layers[0].mlp(b.x), b.target, atol=1e-5)


def test_two_models_see_the_same_tokens(gpt2, tokenizer, texts):
    ft = tiny.make_gpt2(seed=5)
    src = ModelSource(
        {"base": gpt2, "ft": ft},
        tokenizer,
        texts,
        hookpoints=["transformer.h.0", "transformer.h.1"],
        context_size=16,
        batch_size=16,
        buffer_tokens=64,
        model_name={"base": "gpt2-a", "ft": "gpt2-b"},
    )
    names = ["base/transformer.h.0", "base/transformer.h.1", "ft/transformer.h.0", "ft/transformer.h.1"]
    assert src.site_names == names and src.x_site == "base/transformer.h.0"
    assert src.model_name == "base=gpt2-a, ft=gpt2-b"
    ref = {alias: _direct(m, tokenizer, texts, ["transformer.h.0", "transformer.h.1"]) for alias, m in
           [("base", gpt2), ("ft", ft)]}  # fmt: skip
    for _ in range(4):
        b = next(src)
        k = _rows_of(b, "base/transformer.h.0", ref["base"]["transformer.h.0"])
        assert torch.equal(b.tokens, ref["base"]["tokens"][k]) and torch.equal(
            ref["ft"]["tokens"], ref["base"]["tokens"]
        )
        for alias in ("base", "ft"):
            for hp in ("transformer.h.0", "transformer.h.1"):
                assert torch.allclose(b.sites[f"{alias}/{hp}"], ref[alias][hp][k], atol=1e-5)
        assert not torch.allclose(b.sites["base/transformer.h.1"], b.sites["ft/transformer.h.1"])


@pytest.mark.parametrize("two_models", [False, True])
def test_multi_site_source_resumes_exactly(gpt2, tokenizer, texts, two_models):
    model = {"base": gpt2, "ft": tiny.make_gpt2(seed=5)} if two_models else gpt2

    def make():
        return ModelSource(
            model,
            tokenizer,
            texts[:6],  # small, so the batches below wrap around the data
            hookpoints=["transformer.h.*"],
            context_size=16,
            batch_size=32,
            buffer_tokens=128,
            model_batch_size=4,
            repeat=True,
            seed=2,
        )

    src = make()
    for _ in range(5):
        next(src)
    state = src.state_dict()
    ref = [next(src) for _ in range(10)]  # crosses several blocks and an epoch
    other = make()
    other.load_state_dict(state)
    for a, b in zip(ref, (next(other) for _ in ref)):
        assert list(a.sites) == list(b.sites) and len(a.sites) == (4 if two_models else 2)
        assert torch.equal(a.tokens, b.tokens)
        assert all(torch.equal(a.sites[k], b.sites[k]) for k in a.sites)
    assert src.rows.epoch >= 1


def test_config_two_model_folders_with_aliases_and_held_out(tmp_path, gpt2, tokenizer):
    base = _saved(tmp_path, "base", gpt2, tokenizer)
    ft = _saved(tmp_path, "ft", tiny.make_gpt2(seed=5), tokenizer)
    spec = _spec(models=[base, ft], hookpoints=["transformer.h.1"])  # a list: aliases base, ft
    src = build_source(spec)
    assert src.site_names == ["base/transformer.h.1", "ft/transformer.h.1"]
    assert src.harvester.model_names == {"base": base, "ft": ft}
    b = next(src)
    assert b.sites["base/transformer.h.1"].shape == b.sites["ft/transformer.h.1"].shape == (16, 64)
    mapped = build_source(
        _spec(models={"pre": base, "post": {"model": ft, "dtype": "float32"}}, hookpoint="transformer.h.1")
    )
    assert mapped.site_names == ["pre/transformer.h.1", "post/transformer.h.1"]
    evaluation = held_out(spec)
    assert evaluation.seed == parse_source(spec).seed + 7919 and evaluation.models == parse_source(spec).models
    e = next(evaluation.build())
    assert list(e.sites) == list(b.sites) and not torch.equal(e.tokens, b.tokens)


def test_bad_sites_and_models_fail_with_one_line_naming_the_field(tmp_path, gpt2, tokenizer, texts):
    kw = dict(context_size=16, batch_size=16, buffer_tokens=64)
    with pytest.raises(
        ConfigError, match=r"hookpoint 'transformer\.h1' matches no module.*near matches: transformer\.h\.1"
    ):
        ModelSource(gpt2, tokenizer, texts, hookpoints=["transformer.h.0", "transformer.h1"], **kw)
    from transformers import GPT2Config, GPT2LMHeadModel

    one_layer = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=64))
    with pytest.raises(ConfigError, match=r"model 'ft': hookpoint 'transformer\.h\.1' matches no module"):
        ModelSource({"base": gpt2, "ft": one_layer}, tokenizer, texts, hookpoints=["transformer.h.1"], **kw)
    with pytest.raises(ConfigError, match="hookpoints is empty"):
        ModelSource(gpt2, tokenizer, texts, hookpoints=[], **kw)
    with pytest.raises(ConfigError, match="not both"):
        ModelSource(gpt2, tokenizer, texts, "transformer.h.0", hookpoints=["transformer.h.1"], **kw)
    with pytest.raises(ConfigError, match="target_hookpoint reads one model"):
        ModelSource({"base": gpt2}, tokenizer, texts, "transformer.h.0", target_hookpoint="transformer.h.1", **kw)
    with pytest.raises(ConfigError, match=r"models: alias 'a/b' must be"):
        ModelSource({"a/b": gpt2}, tokenizer, texts, "transformer.h.0", **kw)
    small = tiny.make_gpt2()
    small.resize_token_embeddings(len(tokenizer) - 1)
    with pytest.raises(ConfigError, match=r"model 'ft' has \d+ token embeddings but the shared tokenizer has"):
        ModelSource({"base": gpt2, "ft": small}, tokenizer, texts, "transformer.h.0", **kw)

    # the typed config refuses before anything is loaded, naming the field
    cases = [
        (dict(model="m", hookpoints=[]), r"'hookpoints': .*the list is empty"),
        (dict(model="m", hookpoint="a", hookpoints=["b"]), r"'hookpoints': .*not both"),
        (dict(model="m"), r"'hookpoints': .*needs `hookpoint`"),
        (dict(model="m", models={"base": "m"}, hookpoint="a"), r"'models': .*exactly one"),
        (dict(hookpoint="a"), r"'models': .*exactly one"),
        (
            dict(models=[{"model": "m", "alias": "x"}, {"model": "n", "alias": "x"}], hookpoint="a"),
            r"'models': .*duplicate alias 'x'",
        ),  # fmt: skip
        (dict(models=["a", "b", "c"], hookpoint="a"), r"'models': .*entry 0 has no `alias`"),
        (dict(models={"base": "m"}, hookpoint="a", target_hookpoint="b"), r"'target_hookpoint': .*one model"),
        (dict(models={"base": {"model": "m", "dtype": "int8"}}, hookpoint="a"), r"'models\.base\.dtype'"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            parse_source(_spec(**values))
        assert "\n" not in str(err.value)

    # vocabularies are compared when the models are loaded
    other_tok = _tokenizer(tiny.WORDS + ["zebra"])
    base = _saved(tmp_path, "base", gpt2, tokenizer)
    other = _saved(tmp_path, "other", tiny.make_gpt2(seed=2), other_tok)
    with pytest.raises(
        ConfigError, match=r"models: the tokenizers of 'base' \(\d+ tokens\) and 'ft' \(\d+ tokens\) differ"
    ):
        build_source(_spec(models={"base": base, "ft": other}, hookpoint="transformer.h.0"))
    shuffled = _tokenizer(list(reversed(tiny.WORDS)))
    with pytest.raises(ConfigError, match="map them to different ids"):
        ModelSource({"base": gpt2, "ft": gpt2}, {"base": tokenizer, "ft": shuffled}, texts, "transformer.h.0", **kw)


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tiny.SPECIALS + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
