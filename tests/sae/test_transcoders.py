"""Transcoders, skip transcoders and crosscoders: one SAE class reading and writing named sites.

Shapes are asymmetric (d_in 5, d_out 7) so that any transposition fails.
"""

import pytest
import torch

import saelab
from saelab.activations.base import Batch
from saelab.errors import ConfigError
from saelab.evals.summary import evaluate
from saelab.sae import StepContext
from saelab.sae.registry import capable_architectures

D_IN, D_OUT, D_SAE = 5, 7, 15
TRANSCODERS = capable_architectures("transcoder")
CROSSCODERS = capable_architectures("crosscoder")


def knobs(arch: str) -> dict:
    return {"k": 3} if saelab.sae.get_class(arch).sweep_parameter == "k" else {}


def transcoder(arch: str, skip: bool = False, **extra) -> saelab.SAE:
    cfg = {"architecture": arch, "d_in": D_IN, "d_out": D_OUT, "d_sae": D_SAE, "site": "mlp_in"}
    return saelab.create({**cfg, "write_site": "mlp_out", "skip": skip, **knobs(arch), **extra})


def crosscoder(arch: str, n_sites: int = 3, width: int = 4) -> saelab.SAE:
    sites = [f"layer{i}" for i in range(n_sites)]
    return saelab.create({"architecture": arch, "d_in": n_sites * width, "d_sae": D_SAE, "site": sites, **knobs(arch)})


def perturb(sae: saelab.SAE) -> saelab.SAE:
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if hasattr(sae, "threshold") and not isinstance(sae.threshold, torch.nn.Parameter):
            sae.threshold.fill_(0.2)  # BatchTopK's inference threshold, estimated
    return sae


def all_kinds():
    for arch in TRANSCODERS:
        yield pytest.param(arch, "transcoder", id=f"{arch}-transcoder")
        yield pytest.param(arch, "skip", id=f"{arch}-skip")
    for arch in CROSSCODERS:
        yield pytest.param(arch, "crosscoder", id=f"{arch}-crosscoder")


def build(arch: str, kind: str) -> saelab.SAE:
    return transcoder(arch, skip=kind == "skip") if kind != "crosscoder" else crosscoder(arch)


def test_the_main_families_can_transcode_and_crosscode():
    for arch in ("relu", "jumprelu", "topk", "batchtopk", "matryoshka"):
        assert arch in TRANSCODERS and arch in CROSSCODERS


@pytest.mark.parametrize("arch,kind", list(all_kinds()))
def test_shapes_forward_and_gradient_reach_every_parameter(arch, kind):
    sae = perturb(build(arch, kind))
    d_in, d_out = sae.cfg.d_in, sae.cfg.output_width
    assert sae.W_enc.shape == (d_in, D_SAE) and sae.W_dec.shape == (D_SAE, d_out) and sae.b_dec.shape == (d_out,)
    if kind != "crosscoder":
        assert sae.b_in.shape == (D_IN,)  # the input bias is its own; b_dec lives in the output space
    if kind == "skip":
        assert sae.W_skip.shape == (D_OUT, D_IN)  # SAELens' orientation
    x = 2 * torch.randn(256, d_in)
    sae.eval()
    skip = sae.skip_out(x) if kind == "skip" else 0
    torch.testing.assert_close(sae.decode(sae.encode(x)) + skip, sae(x), rtol=0, atol=1e-6)
    sae.train()
    target = torch.randn(256, d_out)
    ctx = StepContext(dead_mask=torch.ones(D_SAE, dtype=torch.bool), target=target)
    out = sae.train_forward(x, ctx)
    assert out.x_hat.shape == (256, d_out)
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("arch,kind", list(all_kinds()))
def test_save_load_identity(arch, kind, tmp_path):
    sae = perturb(build(arch, kind)).eval()
    saelab.save(sae, tmp_path / "d")
    back = saelab.load(tmp_path / "d").eval()
    assert back.cfg.read_sites == sae.cfg.read_sites and back.cfg.write_sites == sae.cfg.write_sites
    x = torch.randn(64, sae.cfg.d_in)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch,kind", list(all_kinds()))
def test_folding_per_site_scales_gives_raw_activations_the_trained_outputs(arch, kind):
    """A dictionary trained on x*s to reproduce y*t, folded, maps raw x to raw y exactly."""
    sae = perturb(build(arch, kind)).eval()
    d_in, d_out = sae.cfg.d_in, sae.cfg.output_width
    if kind == "crosscoder":
        s = t = torch.tensor([0.5, 2.0, 3.0]).repeat_interleave(d_in // 3)
    else:
        s, t = 0.4, 2.5
    x = torch.randn(64, d_in)
    on_scaled = sae(x * s) / t
    latents = sae.encode(x * s)
    sae.fold_scales(s, t)
    torch.testing.assert_close(sae(x), on_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), latents, rtol=1e-5, atol=1e-5)
    assert d_out == sae.cfg.output_width


def test_crosscoder_decoder_norm_is_the_sum_of_per_site_norms():
    sae = perturb(crosscoder("relu", n_sites=2, width=4))
    per_site = torch.stack([sae.W_dec[:, :4].norm(dim=1), sae.W_dec[:, 4:].norm(dim=1)], 1)
    torch.testing.assert_close(sae.site_decoder_norms(), per_site)
    torch.testing.assert_close(sae.sparsity_weights(), per_site.sum(1))  # free rows: L1 weighted by it
    assert sae.cfg.decoder_norm == "penalty"


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_crosscoder_latents_compete_on_their_contribution(arch):
    """A crosscoder (free rows) chooses latents by f_i * |d_i|, what they add to the output."""
    sae = perturb(crosscoder(arch, n_sites=2, width=4)).eval()
    with torch.no_grad():
        sae.W_dec[0] *= 100  # latent 0's rows are huge: it wins whenever its code is positive
    x = torch.randn(256, 8)
    pre = sae.pre_acts(x)
    f = sae.activation(pre)
    assert ((f[:, 0] > 0) == (pre[:, 0] > 0)).float().mean() > 0.95


def test_config_errors_name_the_problem():
    base = {"architecture": "topk", "d_in": 6, "d_sae": 8, "k": 2}
    cases = [
        ({"site": "a", "write_site": "a"}, "is an SAE"),
        ({"site": ["a"]}, "at least two sites"),
        ({"site": ["a", "a"]}, "twice"),
        ({"site": ["a", "b", "c", "d"]}, "not divisible"),
        ({"site": ["a", "b"], "write_site": "c"}, "drop write_site"),
        ({"write_site": "b"}, "needs `site`"),
        ({"site": "a", "skip": True}, "needs a transcoder"),
        ({"site": "a", "d_out": 3}, "no write_site"),
    ]
    for extra, words in cases:
        with pytest.raises(ConfigError, match=words):
            saelab.create({**base, **extra})
    with pytest.raises(ConfigError, match="cannot be a transcoder; architectures that can: .*topk"):
        saelab.create({"architecture": "gated", "d_in": 6, "d_sae": 8, "site": "a", "write_site": "b"})
    with pytest.raises(ConfigError, match="cannot be a crosscoder"):
        saelab.create({"architecture": "gated", "d_in": 6, "d_sae": 8, "site": ["a", "b"]})


def test_batch_view_concatenates_sites_in_order():
    a, b = torch.randn(3, 2), torch.randn(3, 4)
    batch = Batch(x=a, sites={"a": a, "b": b})
    v = batch.view(["b", "a"])
    torch.testing.assert_close(v.x, torch.cat([b, a], 1))
    assert v.target is v.x
    t = batch.view("a", "b")
    assert t.x is a and t.target is b
    with pytest.raises(ConfigError, match="no site 'c'; its sites: a, b"):
        batch.view(["a", "c"])


def _sparse_map_batches(n: int, seed: int = 0, rows: int = 256):
    """Sparse features read in 5 dims and written in 7 through a fixed map, at different scales."""
    g = torch.Generator().manual_seed(1234)
    e_in, e_out = torch.randn(24, D_IN, generator=g), torch.randn(24, D_OUT, generator=g)

    def make():
        for i in range(n):
            gi = torch.Generator().manual_seed(seed * 100_000 + i)
            f = (torch.rand(rows, 24, generator=gi) < 0.08) * torch.rand(rows, 24, generator=gi)
            x, y = 10 * f @ e_in, 0.1 * f @ e_out
            yield Batch(x=x, sites={"mlp_in": x, "mlp_out": y})

    return make


def test_trainer_scales_each_site_and_the_result_takes_raw_activations():
    data = _sparse_map_batches(200)
    r = saelab.train(transcoder("topk", k=4), data, {"steps": 150, "progress": False, "lr": 3e-3, "log_every": 10})
    first = list(data())[:8]
    for site, width in (("mlp_in", D_IN), ("mlp_out", D_OUT)):
        mean_norm = torch.cat([b.sites[site] for b in first]).norm(dim=1).mean()
        assert r.site_scales[site] == pytest.approx(width**0.5 / float(mean_norm), rel=1e-5)
    assert r.input_scale == r.site_scales["mlp_in"]
    held_out = list(_sparse_map_batches(4, seed=1)())
    rec = evaluate(r.sae, held_out).as_dict()
    # On raw activations (inputs 100x the outputs' scale) the folded transcoder scores what it
    # scored in training on scaled ones (the last logged batches' FVU, which vary by about 0.05);
    # a fold that missed either scale would be off by orders of magnitude. It also beats the
    # constant output (FVU 1).
    trained = sum(h["fvu"] for h in r.history[-3:]) / 3
    assert abs(rec["fvu"] - trained) < 0.1 and rec["fvu"] < 0.9 and rec["l0"] <= 4


def test_resume_keeps_per_site_scales(tmp_path):
    """Killed mid-run, a crosscoder resumes bit-exactly with the per-site scales it started with."""
    data = _two_sites(_sparse_map_batches(200))
    cfg = {"steps": 40, "progress": False, "checkpoint_every": 10}
    full = saelab.train(crosscoder("batchtopk", n_sites=2, width=6), data, cfg, tmp_path / "a")

    def killed():
        for i, batch in enumerate(data()):
            if i == 25:  # norm estimation reads 8 batches and rewinds: this is training step 25
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        saelab.train(crosscoder("batchtopk", n_sites=2, width=6), killed, cfg, tmp_path / "b")
    resumed = saelab.train(crosscoder("batchtopk", n_sites=2, width=6), data, cfg, tmp_path / "b")
    assert resumed.steps == 40 and resumed.site_scales == full.site_scales
    for name, p in full.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], p), name


def _two_sites(make):
    """Crosscoder sites layer0/layer1 of width 6 from the transcoder batches (padded input)."""

    def gen():
        for b in make():
            a = torch.cat([b.sites["mlp_in"], b.sites["mlp_in"][:, :1]], 1)
            c = b.sites["mlp_out"][:, :6]
            yield Batch(x=a, sites={"layer0": a, "layer1": c})

    return gen


def test_evaluation_reports_per_site_and_skip_parts():
    data = _sparse_map_batches(200)
    r = saelab.train(transcoder("topk", skip=True, k=4), data, {"steps": 150, "progress": False, "lr": 3e-3})
    rec = evaluate(r.sae, list(_sparse_map_batches(4, seed=1)())).as_dict()
    assert rec["fvu"] <= min(rec["fvu_skip_only"], rec["fvu_dictionary_only"]) + 1e-6
    xc = saelab.train(crosscoder("relu", n_sites=2, width=6), _two_sites(data), {"steps": 50, "progress": False})
    rec = evaluate(xc.sae, list(_two_sites(_sparse_map_batches(4, seed=1))())).as_dict()
    assert set(rec["per_site"]) == {"layer0", "layer1"}
    for site in rec["per_site"].values():
        assert 0 <= site["fvu"] and site["explained_variance"] == pytest.approx(1 - site["fvu"])


def test_a_missing_site_fails_before_training_naming_it():
    data = _sparse_map_batches(20)
    sae = saelab.create(
        {"architecture": "topk", "d_in": D_IN, "d_out": D_OUT, "d_sae": 8, "k": 2, "site": "mlp_in", "write_site": "x"}
    )
    with pytest.raises(ConfigError, match="no site 'x'; its sites: mlp_in, mlp_out"):
        saelab.train(sae, data, {"steps": 5, "progress": False})
