import pytest
import torch

from saelab.errors import ConfigError
from saelab.models import hooks


def _ids(tokenizer, texts, n=3, t=12):
    rows = [tokenizer(s, add_special_tokens=False)["input_ids"][:t] for s in texts[:n]]
    rows = [r + [tokenizer.pad_token_id] * (t - len(r)) for r in rows]
    return torch.tensor(rows)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hook_values_equal_hidden_states(family, request, tokenizer, texts):
    model = request.getfixturevalue(family)
    ids = _ids(tokenizer, texts)
    path = "transformer.h.*" if family == "gpt2" else "model.layers.*"
    hps = hooks.resolve(model, path)
    assert [hp.name for hp in hps] == [path[:-1] + "0", path[:-1] + "1"]
    acts = hooks.run(model, ids, hps, stop_early=False)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of block i (the last one is after the final norm)
    assert torch.equal(acts[hps[0].name], ref[1])
    norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    assert torch.allclose(norm(acts[hps[1].name]), ref[2], atol=1e-6)


def test_input_hookpoint_reads_module_input(gpt2, tokenizer, texts):
    ids = _ids(tokenizer, texts)
    hp_in = hooks.resolve(gpt2, "transformer.h.1:input")
    hp_out = hooks.resolve(gpt2, "transformer.h.0")
    out = hooks.run(gpt2, ids, hp_in + hp_out)
    assert hp_in[0].name == "transformer.h.1:input"
    assert torch.equal(out["transformer.h.1:input"], out["transformer.h.0"])


def test_forward_stops_after_last_hooked_module(gpt2, tokenizer, texts):
    before = len(gpt2.transformer.h[0]._forward_hooks)
    calls = []
    handles = [gpt2.transformer.h[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(2)]
    handles.append(gpt2.lm_head.register_forward_hook(lambda m, a, o: calls.append("head")))
    try:
        hooks.run(gpt2, _ids(tokenizer, texts), hooks.resolve(gpt2, "transformer.h.0.mlp"))
        assert calls == []  # block 0's own hook never ran: the pass stopped inside it
        hooks.run(gpt2, _ids(tokenizer, texts), hooks.resolve(gpt2, "transformer.h.0"))
        assert calls == [0]
        hooks.run(gpt2, _ids(tokenizer, texts), hooks.resolve(gpt2, "transformer.h.0"), stop_early=False)
        assert calls == [0, 0, 1, "head"]
    finally:
        for h in handles:
            h.remove()
    assert len(gpt2.transformer.h[0]._forward_hooks) == before  # saelab's hooks were removed too


def test_unknown_hookpoint_lists_near_matches(llama):
    with pytest.raises(ConfigError, match=r"model\.layers\.1") as err:
        hooks.resolve(llama, "model.layer.1")
    assert "matches no module" in str(err.value)
    with pytest.raises(ConfigError, match=r"near matches: model\.layers\.0"):
        hooks.resolve(llama, "model.layers.40")
    with pytest.raises(ConfigError, match="input' or 'output"):
        hooks.resolve(llama, "model.layers.1:inpt")
