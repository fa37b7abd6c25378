import html
import json
import re
import struct

import pytest
import torch

import saelab
from saelab.cli import main
from saelab.models.text import TokenRows, load_texts
from saelab.reading import ContextCollection, collect_contexts
from saelab.reading.dashboard import sites_from_metadata, write_dashboard
from tests.models import tiny
from tests.reading.chromium import Browser, find_chromium

HP = "transformer.h.0"
HOSTILE = {
    "cat": "<script>window.__pwned=1</script>",
    "dog": '"><img src=x onerror="window.__pwned=2">',
    "owl": "</span><b onmouseover=\"window.__pwned=3\">'x'</b>",
}
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it as root)",
)


class HostileTokenizer:
    """The tiny tokenizer, except that three words decode to HTML/JS injection attempts."""

    def __init__(self, base):
        self.base = base
        self.swap = {base.convert_tokens_to_ids(k): v for k, v in HOSTILE.items()}

    def decode(self, ids, **kw):
        ids = list(ids)
        if len(ids) == 1 and int(ids[0]) in self.swap:
            return self.swap[int(ids[0])]
        return self.base.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.base, name)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash")
    tok, model = HostileTokenizer(tiny.make_tokenizer()), tiny.make_gpt2()
    sae = saelab.create({"architecture": "relu", "d_in": 64, "d_sae": 32, "seed": 1})
    with torch.no_grad():
        sae.b_enc.fill_(-0.03)
    src = TokenRows(load_texts(tiny.make_texts(30, seed=4)), tok.base, context_size=16)
    batches = []
    while (b := src.next_rows(4)) is not None:
        batches.append(b)
    col = collect_contexts(
        sae,
        model,
        batches,
        hookpoint=HP,
        tokenizer=tok,
        latents=list(range(0, 32, 4)),
        top_k=5,
        n_bins=3,
        per_bin=3,
        window=10,
        progress=False,
        metadata={"sae": "<b>runs/x</b>", "model": "tiny", "data": "grammar", "context_size": 16},
    )
    summary = write_dashboard(col, sae, model, out, tok, sites=sites_from_metadata({}, HP))
    return out, col, summary


def _pages(out):
    return [out / "index.html", *sorted((out / "latents").glob("*.html"))]


def test_site_files_and_hostile_text_is_escaped(site):
    out, col, summary = site
    assert summary["pages"] == 8 and summary["final_norm"] == "transformer.ln_f"
    assert {p.name for p in (out / "latents").glob("*.html")} == {f"{i}.html" for i in range(0, 32, 4)}
    assert set(HOSTILE.values()) <= set(col.tokens.values())  # the corpus really carries them
    shown = 0
    for page in _pages(out):
        text = page.read_text()
        assert "<script>window" not in text and "<img" not in text and "<b onmouseover" not in text
        assert "http://" not in text and "https://" not in text  # nothing to fetch
        assert len(re.findall(r"<script", text)) == (page.name == "index.html")  # only our own script
        shown += sum(html.escape(v, quote=True) in text for v in HOSTILE.values())
    assert shown >= 3
    assert "&lt;b&gt;runs/x&lt;/b&gt;" in (out / "index.html").read_text()
    assert ContextCollection.load(out / "contexts.json") == col


@needs_chromium
def test_pages_render_in_headless_chromium_without_errors(site, tmp_path):
    out, col, _ = site
    browser = Browser(CHROMIUM, width=1200, height=900)
    try:
        for page_path in _pages(out)[:4]:
            page = browser.open(page_path.as_uri())
            assert page.errors() == [], page_path.name
            assert page.requests() == [page_path.as_uri()]  # no other file, no network
            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert page.evaluate("document.querySelectorAll('img, [onerror], [onmouseover]').length") == 0
            assert page.evaluate("document.scripts.length") == (page_path.name == "index.html")
            text = page.evaluate("document.body.innerText")
            if page_path.name != "index.html":
                assert page.evaluate("document.querySelectorAll('.ctx .t').length") > 0
                # the hostile tokens are on screen as text, and each token's value is its tooltip
                tips = page.evaluate("Array.from(document.querySelectorAll('.t')).map(e => e.dataset.v)")
                assert any(HOSTILE["cat"] in t or HOSTILE["dog"] in t for t in tips)
                assert HOSTILE["cat"] in text or HOSTILE["dog"] in text or HOSTILE["owl"] in text
            png = page.screenshot()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            width, height = struct.unpack(">II", png[16:24])
            assert width == 1200 and height > 300
            (tmp_path / f"{page_path.stem}.png").write_bytes(png)

        # the index sorts by a column and filters by token
        page = browser.open((out / "index.html").as_uri())
        col_ids = "Array.from(document.querySelectorAll('#latents tbody tr')).map(r => +r.cells[0].dataset.sort)"
        page.evaluate("document.querySelectorAll('#latents th')[1].click()")
        by_density = page.evaluate(col_ids)
        want = sorted(col.latents, key=lambda i: -col.latents[i].density)
        assert [col.latents[i].density for i in by_density] == [col.latents[i].density for i in want]
        page.evaluate("document.querySelectorAll('#latents th')[1].click()")
        again = page.evaluate(col_ids)
        assert [col.latents[i].density for i in again] == [col.latents[i].density for i in by_density][::-1]
        page.evaluate(
            "var s = document.getElementById('search'); s.value = 'river'; s.dispatchEvent(new Event('input'))"
        )
        shown = page.evaluate(
            "Array.from(document.querySelectorAll('#latents tbody tr')).filter(r => r.style.display !== 'none')"
            ".map(r => r.dataset.tokens)"
        )
        assert 0 < len(shown) and all("river" in t for t in shown)
        assert page.errors() == []
    finally:
        browser.close()


def test_neuronpedia_export_carries_the_same_data(site):
    out, col, _ = site
    batch = json.loads((out / "neuronpedia" / "batch-0.json").read_text())
    assert batch["model_id"] == "tiny" and batch["layer"] == 0 and batch["sae_set"]
    assert [f["feature_index"] for f in batch["features"]] == list(col.latents)
    for f in batch["features"]:
        lc = col.latents[f["feature_index"]]
        assert f["frac_nonzero"] == lc.density
        assert len(f["pos_str"]) == len(f["neg_str"]) == 10
        assert f["pos_values"] == sorted(f["pos_values"], reverse=True) and f["pos_values"][0] >= f["neg_values"][0]
        assert sum(f["freq_hist_data_bar_heights"]) == lc.n_fired
        assert (
            len(f["correlated_features_indices"]) == 10 and f["feature_index"] not in f["correlated_features_indices"]
        )
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert [a["tokens"] for a in top] == [col.text(c.token_ids) for c in lc.top]
        assert all(len(a["tokens"]) == len(a["values"]) for a in f["activations"])
        quant = [a for a in f["activations"] if a["bin_min"] != -1]
        assert len(quant) == sum(len(b) for b in lc.quantiles)
        assert all(a["bin_min"] - 1e-4 <= max(a["values"]) for a in quant)


def test_sites_come_from_the_metadata_when_present():
    assert sites_from_metadata({}, "h.3") == {"reads": ["h.3"], "writes": ["h.3"]}
    assert sites_from_metadata({"sites": {"reads": "a.mlp:input", "writes": ["a.mlp"]}}, "h") == {
        "reads": ["a.mlp:input"],
        "writes": ["a.mlp"],
    }
    assert sites_from_metadata({"hook_name": "x", "hook_name_out": "y"}, "h") == {"reads": ["x"], "writes": ["y"]}


def test_dashboard_command_on_a_tiny_model(tmp_path):
    from saelab.io.saelens import save

    tok, model = tiny.make_tokenizer(), tiny.make_gpt2()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n\n".join(tiny.make_texts(40)))
    sae = saelab.create({"architecture": "relu", "d_in": 64, "d_sae": 32})
    alive = torch.tensor([0.0] * 16 + [0.1] * 16)  # the training run saw only latents 16-31 fire
    save(sae, tmp_path / "sae", sparsity=alive)
    common = ["--model", str(tmp_path / "model"), "--hookpoint", HP, "--data", str(tmp_path / "corpus.txt")]
    common += ["--context-size", "16"]
    out = tmp_path / "dash"
    args = ["dashboard", str(tmp_path / "sae"), *common, "--rows", "12", "--n-latents", "5", "--top-k", "3"]
    assert main([*args, "--window", "8", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["pages"] == 5 and res["rows"] == 12 and res["tokens"] > 0
    pages = sorted(int(p.stem) for p in (out / "latents").glob("*.html"))
    assert len(pages) == 5 and all(p >= 16 for p in pages)
    index = (out / "index.html").read_text()
    assert all(f'href="latents/{p}.html"' in index for p in pages)
    assert main([*args, "--latents", "2,3", "--out", str(tmp_path / "d2")]) == 0
    assert sorted(p.stem for p in (tmp_path / "d2" / "latents").glob("*.html")) == ["2", "3"]
    assert main([*args, "--latents", "2,x", "--out", str(tmp_path / "d3")]) == 2
    assert main([*args, "--latents", "99", "--out", str(tmp_path / "d3")]) == 2
