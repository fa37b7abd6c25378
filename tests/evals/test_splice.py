"""Splicing transcoders, skip transcoders, crosscoders and cross-layer transcoders into a tiny model."""

import copy

import pytest
import torch

import saelab
from saelab.errors import ConfigError
from saelab.evals.splice import KL_DIRECTION, TranscoderStack, is_causal, splice_fidelity
from saelab.models import hooks
from saelab.models.text import TokenRows, keep_mask, load_texts, special_ids
from saelab.sae.base import SAEConfig
from tests.models import tiny

MLP = "transformer.h.{}.mlp"


class Exact(torch.nn.Module):
    """A dictionary whose output is `fn(x)` exactly: what a perfect transcoder/crosscoder/CLT gives."""

    def __init__(self, fn, **cfg):
        super().__init__()
        self.cfg = SAEConfig(architecture="exact", d_sae=1, **cfg)
        self.fn = fn
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the dictionary a device

    def forward(self, x, tokens=None):
        return self.fn(x)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = tiny.make_tokenizer()
    model = tiny.trained_gpt2()
    rows = TokenRows(load_texts(tiny.make_texts(12, seed=9)), tok, context_size=16)
    return model, tok, [rows.next_rows(6) for _ in range(2)]


def _mlp(model, layer):
    """A copy of the model's MLP (the original carries the splice's hooks while it runs)."""
    return copy.deepcopy(dict(model.named_modules())[MLP.format(layer)])


def perfect_transcoder(model, layer=0):
    mlp = _mlp(model, layer)
    return Exact(lambda x: mlp(x), d_in=64, d_out=64, site=MLP.format(layer) + ":input", write_site=MLP.format(layer))


def perfect_clt(model):
    """Layer l's output is the model's own MLP l applied to input l: block-diagonal, hence causal."""

    mlps = [_mlp(model, 0), _mlp(model, 1)]

    def fn(x):
        return torch.cat([mlp(part) for mlp, part in zip(mlps, x.chunk(2, -1))], -1)

    clt = Exact(fn, d_in=128, site="x")
    clt.cfg = _CLTConfig([0, 1])
    return clt


def test_a_perfect_transcoder_restores_the_clean_logits(setup):
    model, tok, batches = setup
    m = splice_fidelity(perfect_transcoder(model), model, batches, special_ids(tok))
    s = m.spliced
    assert m.kind == "transcoder" and s.sites == [MLP.format(0)]
    assert s.kl_clean_spliced < 1e-6 and s.top1_agreement_spliced == 1.0
    assert abs(s.ce_spliced - s.ce_clean) < 1e-5 and s.ce_recovered_vs_zero == pytest.approx(1.0, abs=1e-4)
    assert s.ce_recovered_vs_mean == pytest.approx(1.0, abs=1e-4)
    # layer 0's MLP matters to the trained model: both baselines hurt
    assert s.ce_zero_ablation > s.ce_clean and s.ce_mean_ablation > s.ce_clean
    assert s.kl_clean_zero_ablation > 0 and s.kl_clean_mean_ablation > 0
    assert m.max_abs_logit_diff_with_error == 0.0 and m.ce_with_error == s.ce_clean
    assert m.kl_direction == KL_DIRECTION and "KL(p_clean || p_spliced)" in m.to_dict()["kl_direction"]
    assert m.open_loop is None and m.skip_only is None


@pytest.mark.parametrize("arch", [{"architecture": "topk", "k": 8}, {"architecture": "relu"}])
def test_a_random_transcoder_is_worse_than_mean_ablation(setup, arch):
    """At layer 1. (At layer 0 a random map beats both ablations of this tiny model: the MLP's output
    there carries which token it is, and a random function of the input still carries that.)"""
    model, tok, batches = setup
    for seed in range(2):
        tc = saelab.create(
            {
                **arch,
                "d_in": 64,
                "d_sae": 128,
                "site": MLP.format(1) + ":input",
                "write_site": MLP.format(1),
                "seed": seed,
            }
        )
        m = splice_fidelity(tc, model, batches, special_ids(tok)).spliced
        assert m.ce_spliced > m.ce_mean_ablation and m.ce_recovered_vs_mean < 0
        assert m.kl_clean_spliced > m.kl_clean_mean_ablation


def test_a_skip_transcoder_whose_skip_is_the_whole_map(setup):
    """The tiny MLP replaced by a linear one: a skip transcoder with W_skip = that map and a zero
    decoder is perfect, and its skip alone is the same splice."""
    torch.manual_seed(0)
    model = tiny.make_gpt2(seed=4)
    tok = tiny.make_tokenizer()
    lin = torch.nn.Linear(64, 64)
    model.transformer.h[1].mlp = lin
    rows = TokenRows(load_texts(tiny.make_texts(8, seed=2)), tok, context_size=12)
    batches = [rows.next_rows(4)]
    tc = saelab.create(
        {
            "architecture": "topk",
            "d_in": 64,
            "d_sae": 32,
            "k": 4,
            "site": MLP.format(1) + ":input",
            "write_site": MLP.format(1),
            "skip": True,
        }
    )
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.W_skip.copy_(lin.weight)
        tc.b_dec.copy_(lin.bias)
    m = splice_fidelity(tc, model, batches, special_ids(tok))
    assert m.kind == "skip_transcoder"
    for s in (m.spliced, m.skip_only):
        assert s.kl_clean_spliced < 1e-9 and s.top1_agreement_spliced == 1.0


def test_the_model_is_only_read(setup):
    model, tok, batches = setup
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)  # the shared model keeps its training's last gradients
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    tc = saelab.create(
        {"architecture": "relu", "d_in": 64, "d_sae": 64, "site": MLP.format(1) + ":input", "write_site": MLP.format(1)}
    )
    splice_fidelity(tc, model, batches, special_ids(tok))
    splice_fidelity(perfect_clt(model), model, batches, special_ids(tok))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in tc.parameters())
    assert model.training == training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks all removed


def test_kl_is_clean_to_spliced_by_hand(setup):
    """KL(p_clean || p_spliced) computed by hand equals the reported number (one row, every position);
    the reverse direction KL(p_spliced || p_clean) differs."""
    model, tok, batches = setup
    ids, mask = batches[0][0][:1], batches[0][1][:1]
    tc = saelab.create(
        {
            "architecture": "topk",
            "d_in": 64,
            "d_sae": 64,
            "k": 4,
            "site": MLP.format(0) + ":input",
            "write_site": MLP.format(0),
            "seed": 3,
        }
    )
    m = splice_fidelity(tc, model, [(ids, mask)], special_ids(tok)).spliced
    keep = keep_mask(ids, mask, special_ids(tok))
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask).logits
        x = hooks.run(model, ids, hooks.resolve(model, MLP.format(0) + ":input"), mask)[MLP.format(0) + ":input"]
        with hooks.intervene(model, hooks.resolve(model, MLP.format(0))[0], lambda y: tc(x[keep]), keep):
            spliced = model(input_ids=ids, attention_mask=mask).logits
    score = (mask[:, :-1].bool() & mask[:, 1:].bool())[0]
    p = torch.softmax(clean[0, :-1][score].double(), -1)
    q = torch.softmax(spliced[0, :-1][score].double(), -1)
    forward = (p * (p.log() - q.log())).sum(-1).mean()
    reverse = (q * (q.log() - p.log())).sum(-1).mean()
    assert m.kl_clean_spliced == pytest.approx(float(forward), rel=1e-4)
    assert abs(float(forward) - float(reverse)) > 1e-3 * float(forward)
    # one position by hand, written out
    t = int(score.nonzero()[0])
    lp, lq = torch.log_softmax(clean[0, t].double(), -1), torch.log_softmax(spliced[0, t].double(), -1)
    assert float(sum(lp.exp()[v] * (lp[v] - lq[v]) for v in range(lp.numel()))) == pytest.approx(
        float((p * (p.log() - q.log())).sum(-1)[0]), rel=1e-9
    )


def test_a_perfect_crosscoder_restores_the_clean_logits(setup):
    model, tok, batches = setup
    sites = ["transformer.h.0", "transformer.h.1"]
    cc = Exact(lambda x: x.clone(), d_in=128, site=sites)
    m = splice_fidelity(cc, model, batches, special_ids(tok))
    assert m.kind == "crosscoder" and m.spliced.sites == sites and set(m.per_site) == set(sites)
    for s in [m.spliced, *m.per_site.values()]:
        assert s.kl_clean_spliced < 1e-9 and s.top1_agreement_spliced == 1.0
        assert s.ce_recovered_vs_mean == pytest.approx(1.0, abs=1e-4)
    assert m.max_abs_logit_diff_with_error == 0.0


def test_a_noisy_crosscoder_is_scored_per_site_and_all_at_once(setup):
    model, tok, batches = setup
    sites = ["transformer.h.0", "transformer.h.1"]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(128, 128, generator=gen) * 0.05
    cc = Exact(lambda x: x + x @ noise, d_in=128, site=sites)
    m = splice_fidelity(cc, model, batches, special_ids(tok))
    both, one = m.spliced.kl_clean_spliced, m.per_site[sites[1]].kl_clean_spliced
    assert both > 0 and m.per_site[sites[0]].kl_clean_spliced > 0
    # residual-stream sites: the last replacement overwrites what the earlier one changed upstream,
    # except at special tokens (EOS between documents), which are not replaced but attend to spliced ones
    assert both == pytest.approx(one, rel=1e-2)
    assert m.spliced.top1_agreement_spliced <= 1.0


def test_crosscoder_over_two_models_is_spliced_per_model(setup):
    model, tok, batches = setup
    other = tiny.make_gpt2(seed=7)
    sites = ["base/transformer.h.0", "ft/transformer.h.0"]
    cc = Exact(lambda x: x.clone(), d_in=128, site=sites)
    m = splice_fidelity(cc, {"base": model, "ft": other}, batches, special_ids(tok))
    assert m.spliced is None and set(m.per_model) == {"base", "ft"}
    for alias, s in m.per_model.items():
        assert s.model == alias and s.kl_clean_spliced < 1e-9 and s.top1_agreement_spliced == 1.0
    # ft's clean CE is its own (an untrained model: near log(vocab))
    assert m.per_model["ft"].ce_clean != m.per_model["base"].ce_clean
    with pytest.raises(ConfigError, match="alias 'ft'.*'base'"):
        splice_fidelity(cc, {"base": model}, batches)


def test_a_perfect_clt_replacement_model_agrees_with_the_clean_model(setup):
    model, tok, batches = setup
    clt = perfect_clt(model)
    m = splice_fidelity(clt, model, batches, special_ids(tok))
    assert m.kind == "cross_layer_transcoder" and not m.replacement_note
    for s in (m.spliced, m.open_loop, *m.per_site.values()):
        assert s.top1_agreement_spliced == 1.0 and s.kl_clean_spliced < 1e-9
    assert set(m.per_site) == {MLP.format(0), MLP.format(1)}


class _CLTConfig:
    """The part of a CLT's config the splice reads (the CLT class lives on its own branch)."""

    def __init__(self, layers, skip=False):
        self.read_sites = [MLP.format(i) + ":input" for i in layers]
        self.write_sites = [MLP.format(i) for i in layers]
        self.d_in = self.d_out = self.output_width = 64 * len(layers)
        self.skip = skip
        self.site = self.read_sites


def _clt_cfg():
    return _CLTConfig([0, 1])


def test_closed_loop_errors_compound_open_loop_do_not(setup):
    """A CLT that is exact at layer 1 given its input, but off at layer 0: open loop feeds layer 1 the
    clean input, closed loop feeds it the input the wrong layer 0 produced."""
    model, tok, batches = setup

    mlps = [_mlp(model, 0), _mlp(model, 1)]

    def fn(x):
        a, b = x.chunk(2, -1)
        return torch.cat([mlps[0](a) * 0.0, mlps[1](b)], -1)

    clt = Exact(fn, d_in=64, site="x")
    clt.cfg = _clt_cfg()
    m = splice_fidelity(clt, model, batches, special_ids(tok))
    # layer 1 alone is perfect; layer 0 alone equals zero-ablation of layer 0
    assert m.per_site[MLP.format(1)].kl_clean_spliced < 1e-9
    l0 = m.per_site[MLP.format(0)]
    assert l0.ce_spliced == pytest.approx(l0.ce_zero_ablation, abs=1e-5)
    # open loop: layer 1 from clean input (an error), closed loop: from the spliced input (exact MLP)
    assert m.open_loop.kl_clean_spliced != pytest.approx(m.spliced.kl_clean_spliced, rel=1e-3)
    assert 0 < m.spliced.kl_clean_spliced


def test_a_non_causal_dictionary_gets_open_loop_numbers_only(setup):
    model, tok, batches = setup

    mlps = [_mlp(model, 0), _mlp(model, 1)]

    def fn(x):  # layer 0's output reads layer 1's input
        a, b = x.chunk(2, -1)
        return torch.cat([mlps[0](a) + 0.1 * b, mlps[1](b)], -1)

    assert not is_causal(fn, 2, 128, "cpu") and is_causal(lambda x: x, 2, 128, "cpu")
    clt = Exact(fn, d_in=64, site="x")
    clt.cfg = _clt_cfg()
    m = splice_fidelity(clt, model, batches, special_ids(tok))
    assert m.spliced is None and m.open_loop is not None and "closed-loop" in m.replacement_note
    assert m.max_abs_logit_diff_with_error == 0.0


def test_write_site_that_does_not_exist_names_near_matches(setup):
    model, tok, batches = setup
    tc = Exact(lambda x: x, d_in=64, site=MLP.format(0) + ":input", write_site="transformer.h.0.mpl")
    with pytest.raises(ConfigError, match=r"write site.*transformer\.h\.0\.mpl.*near matches: transformer\.h\.0\.mlp"):
        splice_fidelity(tc, model, batches)


def test_width_that_does_not_match_the_model_is_named(setup):
    model, tok, batches = setup
    tc = saelab.create(
        {
            "architecture": "topk",
            "d_in": 64,
            "d_out": 32,
            "d_sae": 64,
            "k": 4,
            "site": MLP.format(0) + ":input",
            "write_site": MLP.format(0),
        }
    )
    with pytest.raises(
        ConfigError, match=r"write site 'transformer\.h\.0\.mlp'.*width 64 but the dictionary expects 32"
    ):
        splice_fidelity(tc, model, batches)
    cc = Exact(lambda x: x, d_in=96, site=["transformer.h.0", "transformer.h.1"])
    with pytest.raises(ConfigError, match=r"width 64 but the dictionary expects 48 \(96 over 2 sites\)"):
        splice_fidelity(cc, model, batches)


def test_an_sae_is_sent_to_downstream_fidelity(setup):
    model, tok, batches = setup
    sae = saelab.create({"architecture": "topk", "d_in": 64, "d_sae": 64, "k": 4, "site": "transformer.h.0"})
    with pytest.raises(ConfigError, match="downstream_fidelity"):
        splice_fidelity(sae, model, batches)


def test_a_stack_of_transcoders_is_a_replacement_model_whose_layers_alone_are_single_splices(setup):
    model, tok, batches = setup
    tcs = [
        saelab.create(
            {
                "architecture": "topk",
                "d_in": 64,
                "d_sae": 64,
                "k": 8,
                "site": MLP.format(i) + ":input",
                "write_site": MLP.format(i),
                "seed": i,
            }
        )
        for i in range(2)
    ]
    m = splice_fidelity(TranscoderStack(tcs), model, batches, special_ids(tok))
    assert m.kind == "per_layer_transcoders" and not m.replacement_note  # block-diagonal: causal
    for i, tc in enumerate(tcs):
        alone = splice_fidelity(tc, model, batches, special_ids(tok)).spliced
        site = m.per_site[MLP.format(i)]
        assert site.kl_clean_spliced == pytest.approx(alone.kl_clean_spliced, rel=1e-5)
        assert site.ce_mean_ablation == pytest.approx(alone.ce_mean_ablation, rel=1e-6)
    # layer 0 alone is the same splice open or closed; with both layers the two loops differ
    assert m.spliced.kl_clean_spliced != pytest.approx(m.open_loop.kl_clean_spliced, rel=1e-4)
    with pytest.raises(ConfigError, match="not transcoders"):
        TranscoderStack([saelab.create({"architecture": "relu", "d_in": 64, "d_sae": 8})])


def test_the_cross_layer_transcoder_class_spliced_perfectly_agrees_top1_everywhere():
    """The registered CLT (skipped where it is not installed), with weights that reproduce a model
    whose MLPs are linear: latents relu(x) and relu(-x) per input dimension, decoders +-W^T into
    their own layer, zero into later ones; its replacement model is the clean model."""
    pytest.importorskip("saelab.sae.clt")
    tok = tiny.make_tokenizer()
    model = tiny.make_gpt2(seed=5)
    torch.manual_seed(1)
    lins = [torch.nn.Linear(64, 64) for _ in range(2)]
    for i, lin in enumerate(lins):
        model.transformer.h[i].mlp = lin
    rows = TokenRows(load_texts(tiny.make_texts(8, seed=4)), tok, context_size=12)
    batches = [rows.next_rows(4)]
    clt = saelab.create(
        {
            "architecture": "clt_jumprelu",
            "d_in": 128,
            "d_sae": 256,
            "site": [MLP.format(i) + ":input" for i in range(2)],
            "write_site": [MLP.format(i) for i in range(2)],
        }
    )
    eye = torch.eye(64)
    with torch.no_grad():
        clt.log_threshold.fill_(-60.0)  # threshold e^-60: a ReLU
        clt.W_enc.copy_(torch.cat([eye, -eye], 1).expand(2, 64, 128))
        for i, lin in enumerate(lins):
            W = clt.decoders[i]
            W.zero_()
            W[:, 0] = torch.cat([lin.weight.t(), -lin.weight.t()])
        clt.b_dec.copy_(torch.cat([lin.bias for lin in lins]))
    m = splice_fidelity(clt, model, batches, special_ids(tok))
    assert m.kind == "cross_layer_transcoder" and not m.replacement_note
    for s in (m.spliced, m.open_loop, *m.per_site.values()):
        assert s.top1_agreement_spliced == 1.0 and s.kl_clean_spliced < 1e-8
    assert m.spliced.top1_agreement_zero_ablation < 1.0


def test_a_read_site_that_runs_after_its_write_site_is_named(setup):
    model, tok, batches = setup
    tc = Exact(lambda x: x, d_in=64, site=MLP.format(1) + ":input", write_site=MLP.format(0))
    with pytest.raises(ConfigError, match=r"read site\(s\) \['transformer\.h\.1\.mlp:input'\] did not run before"):
        splice_fidelity(tc, model, batches)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("select", "causal"), [("token", False), ("layer", True), ("batch", True)])
def test_a_clt_that_selects_over_every_layer_per_token_has_no_closed_loop(setup, select, causal):
    """A per-token top-k over every layer's latents makes layer l's output depend on later layers'
    inputs; per-layer top-k, and BatchTopK's inference threshold, do not."""
    pytest.importorskip("saelab.sae.clt")
    model, tok, batches = setup
    clt = saelab.create(
        {
            "architecture": "clt_topk",
            "k": 8,
            "select": select,
            "d_in": 128,
            "d_sae": 128,
            "site": [MLP.format(i) + ":input" for i in range(2)],
            "write_site": [MLP.format(i) for i in range(2)],
        }
    )
    m = splice_fidelity(clt, model, batches, special_ids(tok), per_site=False)
    assert (m.spliced is not None) == causal and bool(m.replacement_note) != causal
    assert m.open_loop is not None and m.max_abs_logit_diff_with_error == 0.0 and not m.per_site
