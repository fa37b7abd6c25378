import json

import numpy as np
import pytest
import torch

import saelab
from saelab.errors import ConfigError, FileFormatError
from saelab.models import hooks
from saelab.models.text import TokenRows, keep_mask, load_texts, special_ids
from saelab.reading import ContextCollection, collect_contexts
from saelab.reading.contexts import ContextCollector
from tests.models import tiny

HP = "transformer.h.0"


@pytest.fixture(scope="module")
def setup():
    tok, model = tiny.make_tokenizer(), tiny.make_gpt2()
    sae = saelab.create({"architecture": "relu", "d_in": 64, "d_sae": 24, "seed": 3})
    with torch.no_grad():
        sae.b_enc.fill_(-0.03)
    return tok, model, sae


def rows(tok, n_docs=30, per=4, packing=True):
    src = TokenRows(load_texts(tiny.make_texts(n_docs, seed=2)), tok, context_size=16, packing=packing)
    out = []
    while (b := src.next_rows(per)) is not None:
        out.append(b)
    return out


def exact_latents(model, sae, batches, specials):
    """Every row's latents `[rows, T, d_sae]` (0 where not kept), by brute force."""
    hp = hooks.resolve(model, HP)
    out, keeps = [], []
    for ids, mask in batches:
        h = hooks.run(model, ids, hp, mask)[HP]
        keep = keep_mask(ids, mask, specials)
        f = torch.zeros(*ids.shape, sae.cfg.d_sae)
        f[keep] = sae.encode(h[keep]).detach()
        out.append(f)
        keeps.append(keep)
    return torch.cat(out), torch.cat(keeps)


def test_streaming_top_k_equals_exact_top_k(setup):
    tok, model, sae = setup
    batches = rows(tok)
    specials = special_ids(tok)
    col = collect_contexts(
        sae, model, batches, hookpoint=HP, tokenizer=tok, top_k=6, window=8, n_bins=2, per_bin=2, progress=False
    )
    F, keep = exact_latents(model, sae, batches, specials)
    ids = torch.cat([b[0] for b in batches])
    mask = torch.cat([b[1] for b in batches])
    assert col.n_tokens == int(keep.sum()) and col.n_rows == ids.shape[0]
    fired_any = 0
    for j in range(sae.cfg.d_sae):
        peaks = F[:, :, j].max(1)
        want = sorted(
            ((float(v), r, int(p)) for r, (v, p) in enumerate(zip(peaks.values, peaks.indices)) if v > 0),
            key=lambda t: (-t[0], t[1]),
        )[:6]
        got = col.latents[j].top
        assert [(c.doc, c.position) for c in got] == [(r, p) for _, r, p in want]
        assert [c.value for c in got] == pytest.approx([v for v, _, _ in want], rel=1e-6)
        for c in got:  # the window: 6 tokens before the peak, 1 after, cut at the row and padding
            lo, hi = max(0, c.position - 6), min(int(mask[c.doc].sum()), c.position + 2)
            assert c.token_ids == ids[c.doc, lo:hi].tolist()
            assert c.values == pytest.approx(F[c.doc, lo:hi, j].tolist(), rel=1e-6, abs=1e-7)
            assert c.token_ids[c.peak] not in specials.tolist()
        assert col.latents[j].n_fired == int((F[:, :, j] > 0).sum())
        assert col.latents[j].max_value == pytest.approx(float(F[:, :, j].max()), rel=1e-6)
        fired_any += bool(got)
    assert fired_any >= sae.cfg.d_sae // 2  # the check is not vacuous

    # the same stream cut into batches of another size gives the same contexts
    again = collect_contexts(
        sae,
        model,
        rows(tok, per=7),
        hookpoint=HP,
        tokenizer=tok,
        top_k=6,
        window=8,
        n_bins=2,
        per_bin=2,
        progress=False,
    )
    for j in range(sae.cfg.d_sae):
        assert [(c.doc, c.position) for c in again.latents[j].top] == [(c.doc, c.position) for c in col.latents[j].top]


def test_quantile_bins_are_exact_when_the_reservoir_holds_every_fired_token(setup):
    tok, model, sae = setup
    batches = rows(tok, n_docs=12)
    F, _ = exact_latents(model, sae, batches, special_ids(tok))
    n_fired = int((F > 0).sum((0, 1)).max())
    col = collect_contexts(
        sae, model, batches, hookpoint=HP, tokenizer=tok, n_bins=4, per_bin=n_fired, reservoir=n_fired, progress=False
    )
    for j, lc in col.latents.items():
        vals = np.sort(F[:, :, j][F[:, :, j] > 0].numpy())
        if len(vals) < 4:
            continue
        groups = np.array_split(vals, 4)  # equal-count bins, lowest first
        for b, group in enumerate(groups):
            assert sorted(c.value for c in lc.quantiles[b]) == pytest.approx(group.tolist(), rel=1e-6)
        assert lc.quantile_edges == pytest.approx([g[0] for g in groups] + [vals[-1]], rel=1e-6)


def test_reservoir_is_a_uniform_sample_and_bins_are_ordered():
    """40 fired tokens in batches of 5, 15 and 20 rows; a reservoir of 8: every token should be
    sampled with probability 1/5 whatever batch it came in."""
    n_tokens, reservoir, trials = 40, 8, 300
    values = torch.randperm(n_tokens).float() + 1
    hits = torch.zeros(n_tokens)
    for seed in range(trials):
        c = ContextCollector(1, top_k=1, n_bins=4, per_bin=2, window=1, reservoir=reservoir, n_random=0, seed=seed)
        start = 0
        for size in (5, 15, 20):
            ids = torch.arange(start, start + size)[:, None] + 10
            ones = torch.ones_like(ids)
            c.update(ids, ones, ones.bool(), values[start : start + size, None])
            start += size
        col = c.result()
        lc = col.latents[0]
        assert len(lc.quantiles) == 4 and all(len(b) == 2 for b in lc.quantiles)
        for b, members in enumerate(lc.quantiles):
            lo, hi = lc.quantile_edges[b], lc.quantile_edges[b + 1]
            assert all(lo <= m.value <= hi for m in members)
            if b:
                assert min(m.value for m in members) >= max(m.value for m in lc.quantiles[b - 1])
        for m in (m for b in lc.quantiles for m in b):
            assert m.token_ids == [m.doc + 10] and m.value == values[m.doc]
        sample = c.res.doc[:, 0][torch.isfinite(c.res.key[:, 0])]
        assert len(sample) == reservoir and len(set(sample.tolist())) == reservoir
        hits[sample] += 1
    expected = trials * reservoir / n_tokens  # 60; binomial sd about 6.9
    assert (hits - expected).abs().max() < 5 * (expected * (1 - reservoir / n_tokens)) ** 0.5
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < 80  # 39 degrees of freedom: the 99.9th percentile is about 72 (times 1 - 1/5 here)


def test_value_histogram_counts_every_nonzero_activation_exactly():
    gen = torch.Generator().manual_seed(0)
    c = ContextCollector(3, n_bins=0, window=2, n_random=0)
    seen = []
    for scale in (0.01, 1.0, 37.0, 5.0):  # later batches reach far beyond the first bins
        acts = (torch.rand(50, 3, generator=gen) * scale) * (torch.rand(50, 3, generator=gen) > 0.4)
        ids = torch.arange(50)[:, None].expand(50, 1)
        ones = torch.ones_like(ids)
        c.update(ids, ones, ones.bool(), acts)
        seen.append(acts)
    allv = torch.cat(seen)
    col = c.result()
    for j in range(3):
        h = col.latents[j].value_histogram
        v = allv[:, j][allv[:, j] > 0].double().numpy()
        assert sum(h.counts) == len(v) == col.latents[j].n_fired
        assert h.edges[-1] > v.max() and h.edges[0] == 0 and 32 < len(h.counts) <= 64
        want = np.histogram(v, bins=np.array(h.edges))[0]
        assert h.counts == want.tolist()


def test_json_round_trip_and_damaged_file(setup, tmp_path):
    tok, model, sae = setup
    col = collect_contexts(sae, model, rows(tok, n_docs=8), hookpoint=HP, tokenizer=tok, window=6, progress=False)
    path = col.save(tmp_path / "contexts.json")
    back = ContextCollection.load(path)
    assert back == col and back.text(back.latents[0].top[0].token_ids)[0] in tok.get_vocab()
    for w in col.random_windows:
        assert 0 < len(w) <= 6 and -1 not in w
    assert all(set(f) <= set(range(sae.cfg.d_sae)) for f in col.random_fired)
    d = json.loads(path.read_text())
    del d["latents"][0]["top"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(FileFormatError, match="bad.json"):
        ContextCollection.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FileFormatError, match="not a saelab context collection"):
        ContextCollection.load(tmp_path / "bad.json")


def test_without_a_tokenizer_the_model_config_names_the_special_tokens(setup):
    tok, model, sae = setup
    batches = rows(tok, n_docs=6)
    col = collect_contexts(sae, model, batches, hookpoint=HP, progress=False)
    _, keep = exact_latents(model, sae, batches, special_ids(tok))
    assert col.n_tokens == int(keep.sum()) and col.tokens == {} and col.tokenizer_name is None


def test_bad_requests(setup):
    tok, model, sae = setup
    with pytest.raises(ConfigError, match="out of range"):
        collect_contexts(sae, model, rows(tok, 4), hookpoint=HP, tokenizer=tok, latents=[0, 99], progress=False)
    bos_only = [(torch.full((2, 4), tok.bos_token_id), torch.ones(2, 4, dtype=torch.int64))]
    with pytest.raises(ConfigError, match="no tokens"):
        collect_contexts(sae, model, bos_only, hookpoint=HP, tokenizer=tok, progress=False)
