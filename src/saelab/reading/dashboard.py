"""Feature dashboards: a static, self-contained site (no server, no network) from a
`ContextCollection`, plus the same data as Neuronpedia-style JSON batches.

`DIR/index.html` lists the latents (sortable by density, maximum activation and logit-lens
token; searchable by token) above a histogram of every latent's firing density.
`DIR/latents/<id>.html` shows one latent: its statistics and sites, the value histogram, the
logit lens (top and bottom tokens and the histogram of all logits, read through the final norm;
see `saelab.models.inspection.lens_logits`), the nearest latents by decoder cosine, its top
contexts and its activation-quantile contexts with each token shaded by the activation (value
on hover). CSS and JS are inline and nothing is fetched. Every piece of token text and metadata
is HTML-escaped, and the script only sorts and hides table rows, never writing text into the
page, so text from the corpus cannot run as code.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from saelab.io.atomic import write_json, write_text
from saelab.reading.contexts import Context, ContextCollection, LatentContexts

NP_BATCH = 128  # features per Neuronpedia batch file

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:70em;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
a{color:#0645ad}table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
th{cursor:pointer;user-select:none;background:#f3f3f3}tr:nth-child(even){background:#fafafa}
.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#666}.grid{display:flex;flex-wrap:wrap;gap:2em}
.ctx{font:12.5px/1.9 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;margin:.1em 0;display:flex;gap:.6em}
.ctx .v{flex:0 0 4.5em;text-align:right;color:#555}.t{position:relative;border-radius:2px;padding:1px 0}
.t.pk{outline:1.5px solid #c40}.t:hover{outline:1.5px solid #000}
.t:hover::after{content:attr(data-v);position:absolute;left:0;top:-1.7em;background:#222;color:#fff;
 padding:0 4px;border-radius:3px;font-size:11px;white-space:nowrap;z-index:2;pointer-events:none}
.tok{font-family:ui-monospace,monospace;background:#eef;border-radius:2px;padding:0 2px}
input[type=search]{font-size:1em;padding:3px 6px;width:22em}svg text{font:10px sans-serif;fill:#444}
"""

INDEX_JS = """
(function () {
  var table = document.getElementById('latents');
  var body = table.tBodies[0];
  var dir = {};
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
    th.addEventListener('click', function () {
      var kind = th.getAttribute('data-kind');
      dir[col] = -(dir[col] || (kind === 'text' ? -1 : 1));
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-sort'), y = b.cells[col].getAttribute('data-sort');
        if (kind !== 'text') { x = parseFloat(x); y = parseFloat(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * dir[col];
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  var box = document.getElementById('search');
  box.addEventListener('input', function () {
    var q = box.value.toLowerCase();
    Array.prototype.forEach.call(body.rows, function (r) {
      r.style.display = (!q || r.getAttribute('data-tokens').indexOf(q) >= 0) ? '' : 'none';
    });
  });
})();
"""


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def show_token(t: str) -> str:
    """A token as displayed: line breaks and tabs made visible so a context stays on one line."""
    return t.replace("\r", "\\r").replace("\n", "\u21b5").replace("\t", "\u2192")


def fmt(v: float) -> str:
    return f"{v:.3g}" if v else "0"


# ---------------------------------------------------------------------------- data
def dashboard_data(
    collection: ContextCollection,
    sae,
    model: torch.nn.Module | None,
    tokenizer=None,
    n_logit: int = 10,
    n_neighbours: int = 10,
    sites: dict[str, list[str]] | None = None,
    logit_bins: int = 40,
) -> dict[str, Any]:
    """Everything the pages show, per latent, as plain JSON-ready values."""
    from saelab.models.inspection import _unembedding, lens_logits

    latents = list(collection.latents)
    decode = (lambda i: tokenizer.decode([int(i)])) if tokenizer is not None else (lambda i: f"<{int(i)}>")
    W = sae.W_dec.detach().float().cpu()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out: dict[int, dict[str, Any]] = {}
    lens_rows: dict[int, dict[str, Any]] = {}
    final_norm = None
    if model is not None and _unembedding(model) is not None and latents:
        for i in range(0, len(latents), 128):
            chunk = latents[i : i + 128]
            logits, final_norm = lens_logits(model, W[chunk])
            logits = logits.cpu()
            top, bottom = logits.topk(n_logit), logits.topk(n_logit, largest=False)
            for r, latent in enumerate(chunk):
                lo, hi = float(logits[r].min()), float(logits[r].max())
                counts = torch.histc(logits[r], bins=logit_bins, min=lo, max=hi if hi > lo else lo + 1)
                edges = torch.linspace(lo, hi if hi > lo else lo + 1, logit_bins + 1)
                lens_rows[latent] = {
                    "promoted": [[decode(t), v] for t, v in zip(top.indices[r].tolist(), top.values[r].tolist())],
                    "suppressed": [
                        [decode(t), v] for t, v in zip(bottom.indices[r].tolist(), bottom.values[r].tolist())
                    ],
                    "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
                }
    sims = Wn[latents] @ Wn.t() if latents else torch.zeros(0, W.shape[0])
    for r, latent in enumerate(latents):
        sims[r, latent] = -math.inf
    k = min(n_neighbours, max(W.shape[0] - 1, 0))
    near = sims.topk(k, dim=1) if latents and k else None
    for r, latent in enumerate(latents):
        lc = collection.latents[latent]
        out[latent] = {
            "latent": latent,
            "density": lc.density,
            "n_fired": lc.n_fired,
            "max_value": lc.max_value,
            "logit_lens": lens_rows.get(latent),
            "neighbours": [[int(j), float(c)] for j, c in zip(near.indices[r], near.values[r])] if near else [],
        }
    return {
        "hookpoint": collection.hookpoint,
        "final_norm": final_norm,
        "sites": sites or {"reads": [collection.hookpoint], "writes": [collection.hookpoint]},
        "latents": out,
    }


def sites_from_metadata(metadata: dict[str, Any], hookpoint: str) -> dict[str, list[str]]:
    """Sites the dictionary reads and writes, from the SAE's metadata when it names them
    (`sites: {reads: [...], writes: [...]}`, or SAELens' `hook_name` / `hook_name_out`), else the
    hookpoint for both (an SAE reads and writes one site)."""

    def listed(v: Any) -> list[str]:
        return [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])] if v else []

    sites = metadata.get("sites") if isinstance(metadata.get("sites"), dict) else {}
    reads = listed(sites.get("reads")) or listed(metadata.get("hook_name")) or [hookpoint]
    writes = listed(sites.get("writes")) or listed(metadata.get("hook_name_out")) or reads
    return {"reads": reads, "writes": writes}


# ---------------------------------------------------------------------------- SVG
def svg_histogram(
    counts: list[int],
    edges: list[float],
    title: str,
    xlabel: str,
    marker: float | None = None,
    width: int = 330,
    height: int = 110,
) -> str:
    """Bars as inline SVG; hovering a bar shows its range and count."""
    if not counts:
        return f"<figure><figcaption>{esc(title)}</figcaption><p class='muted'>no data</p></figure>"
    pad_l, pad_b, pad_t = 28, 26, 6
    w, h = width - pad_l - 4, height - pad_b - pad_t
    top = max(max(counts), 1)
    bw = w / len(counts)
    parts = [
        f"<figure><figcaption>{esc(title)}</figcaption>"
        f"<svg width='{width}' height='{height}' role='img'>"
        f"<line x1='{pad_l}' y1='{pad_t + h}' x2='{pad_l + w}' y2='{pad_t + h}' stroke='#999'/>"
    ]
    for i, c in enumerate(counts):
        bh = h * c / top
        parts.append(
            f"<rect x='{pad_l + i * bw:.1f}' y='{pad_t + h - bh:.1f}' width='{max(bw - 0.5, 0.5):.1f}' "
            f"height='{bh:.1f}' fill='#e8792b'><title>{esc(f'{edges[i]:.4g} to {edges[i + 1]:.4g}: {c}')}</title></rect>"
        )
    if marker is not None and edges[0] <= marker <= edges[-1] and edges[-1] > edges[0]:
        x = pad_l + w * (marker - edges[0]) / (edges[-1] - edges[0])
        parts.append(f"<line x1='{x:.1f}' y1='{pad_t}' x2='{x:.1f}' y2='{pad_t + h}' stroke='#06c' stroke-width='2'/>")
    parts.append(
        f"<text x='{pad_l}' y='{height - 13}'>{esc(f'{edges[0]:.3g}')}</text>"
        f"<text x='{pad_l + w}' y='{height - 13}' text-anchor='end'>{esc(f'{edges[-1]:.3g}')}</text>"
        f"<text x='{pad_l + w / 2}' y='{height - 2}' text-anchor='middle'>{esc(xlabel)}</text>"
        f"<text x='{pad_l - 3}' y='{pad_t + 8}' text-anchor='end'>{top}</text></svg></figure>"
    )
    return "".join(parts)


def density_histogram(density: list[float], bins: int = 40) -> tuple[list[int], list[float], int]:
    """Counts of log10(density) over latents that fired, their edges, and the number that never did."""
    logs = [math.log10(d) for d in density if d > 0]
    dead = len(density) - len(logs)
    if not logs:
        return [], [], dead
    lo, hi = math.floor(min(logs) * 2) / 2, max(0.0, math.ceil(max(logs) * 2) / 2)
    hi = hi if hi > lo else lo + 0.5
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in logs:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return counts, [lo + i * width for i in range(bins + 1)], dead


# ---------------------------------------------------------------------------- HTML
def _page(title: str, body: str, script: str = "") -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}"
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>\n"
    )


def context_html(ctx: Context, collection: ContextCollection, scale: float) -> str:
    """One context: every token shaded by the activation relative to `scale`, value on hover."""
    spans = []
    for j, (tid, v) in enumerate(zip(ctx.token_ids, ctx.values)):
        tok = collection.tokens.get(int(tid), f"<{int(tid)}>")
        alpha = min(max(v / scale, 0.0), 1.0) if scale > 0 else 0.0
        shade = f' style="background:rgba(255,120,0,{alpha:.2f})"' if alpha >= 0.005 else ""
        cls = "t pk" if j == ctx.peak else "t"
        spans.append(f'<span class="{cls}"{shade} data-v="{esc(f"{v:.4g} {tok!r}")}">{esc(show_token(tok))}</span>')
    where = f"row {ctx.doc}, token {ctx.position}"
    return f'<div class="ctx"><span class="v" title="{esc(where)}">{fmt(ctx.value)}</span><span>{"".join(spans)}</span></div>'


def peak_tokens(lc: LatentContexts, collection: ContextCollection, n: int = 6) -> list[str]:
    """The distinct tokens the top contexts peak on, best first."""
    seen: list[str] = []
    for c in lc.top:
        t = collection.tokens.get(int(c.token_ids[c.peak]), "") if c.token_ids else ""
        if t not in seen:
            seen.append(t)
    return seen[:n]


def index_html(collection: ContextCollection, data: dict[str, Any], title: str) -> str:
    rows = []
    for latent, lc in collection.latents.items():
        d = data["latents"][latent]
        lens = d["logit_lens"]
        promoted = [t for t, _ in lens["promoted"][:5]] if lens else []
        peaks = peak_tokens(lc, collection)
        search = " ".join([str(latent)] + peaks + promoted).lower()
        toks = " ".join(f"<span class='tok'>{esc(show_token(t))}</span>" for t in peaks[:4])
        logit = " ".join(f"<span class='tok'>{esc(show_token(t))}</span>" for t in promoted)
        rows.append(
            f'<tr data-tokens="{esc(search)}"><td data-sort="{latent}"><a href="latents/{latent}.html">{latent}</a></td>'
            f'<td class="num" data-sort="{lc.density:.8g}">{lc.density:.3g}</td>'
            f'<td class="num" data-sort="{lc.max_value:.8g}">{fmt(lc.max_value)}</td>'
            f'<td data-sort="{esc(promoted[0].strip().lower() if promoted else "")}">{logit}</td>'
            f'<td data-sort="{esc(peaks[0].strip().lower() if peaks else "")}">{toks}</td></tr>'
        )
    counts, edges, dead = density_histogram(collection.density)
    n_all = len(collection.density)
    meta = collection.metadata
    what = f"{esc(meta['sae'])} at " if meta.get("sae") else "at "
    what += f"<b>{esc(collection.hookpoint)}</b>" + (f" of {esc(meta['model'])}" if meta.get("model") else "")
    text = f" of {esc(meta['data'])}" if meta.get("data") else ""
    body = (
        f"<h1>{esc(title)}</h1>"
        f"<p>{what}; {collection.n_tokens:,} tokens in {collection.n_rows:,} rows{text}. "
        f"{n_all:,} latents, {dead:,} never fired ({dead / max(n_all, 1):.1%}); pages for {len(rows):,}. "
        f"Logit lens through {esc(data.get('final_norm') or 'no final norm')}.</p>"
        + svg_histogram(counts, edges, "Firing density of every latent", "log10 density", width=460)
        + "<p><input id='search' type='search' placeholder='search tokens or a latent id' "
        "aria-label='search'> <span class='muted'>Click a column to sort.</span></p>"
        "<table id='latents'><thead><tr><th data-kind='num'>latent</th><th data-kind='num'>density</th>"
        "<th data-kind='num'>max act.</th><th data-kind='text'>logit lens (promoted)</th>"
        "<th data-kind='text'>top-activating tokens</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    return _page(title, body, INDEX_JS)


def latent_html(
    latent: int, collection: ContextCollection, data: dict[str, Any], neighbours_with_pages: set[int], nav: tuple
) -> str:
    lc = collection.latents[latent]
    d = data["latents"][latent]
    scale = lc.max_value
    prev, nxt = nav
    links = ["<a href='../index.html'>index</a>"]
    links += [
        f"<a href='{p}.html'>{label}</a>" for p, label in ((prev, "\u2190 prev"), (nxt, "next \u2192")) if p is not None
    ]
    sites = data["sites"]
    parts = [
        f"<p>{' · '.join(links)}</p><h1>Latent {latent}</h1>",
        f"<p>density {lc.density:.4g} ({lc.n_fired:,} of {lc.n_tokens:,} tokens); max activation {fmt(lc.max_value)}. "
        f"Reads {', '.join(f'<b>{esc(s)}</b>' for s in sites['reads'])}; "
        f"writes {', '.join(f'<b>{esc(s)}</b>' for s in sites['writes'])}.</p>",
        "<div class='grid'>",
    ]
    h = lc.value_histogram
    parts.append(svg_histogram(h.counts, h.edges, "Activation values (fired tokens)", "activation"))
    counts, edges, _ = density_histogram(collection.density)
    marker = math.log10(lc.density) if lc.density > 0 else None
    parts.append(svg_histogram(counts, edges, "Density of all latents (this one: blue line)", "log10 density", marker))
    lens = d["logit_lens"]
    if lens:
        lh = lens["histogram"]
        parts.append(svg_histogram(lh["counts"], lh["edges"], "Logit lens: every token's logit", "logit"))
    parts.append("</div><div class='grid'>")
    if lens:
        for name, key in (("Promoted tokens", "promoted"), ("Suppressed tokens", "suppressed")):
            cells = "".join(
                f"<tr><td><span class='tok'>{esc(show_token(t))}</span></td><td class='num'>{v:+.3f}</td></tr>"
                for t, v in lens[key]
            )
            parts.append(f"<div><h2>{name}</h2><table>{cells}</table></div>")
    cells = "".join(
        (f"<tr><td><a href='{j}.html'>{j}</a></td>" if j in neighbours_with_pages else f"<tr><td>{j}</td>")
        + f"<td class='num'>{c:.3f}</td></tr>"
        for j, c in d["neighbours"]
    )
    parts.append(f"<div><h2>Nearest latents</h2><p class='muted'>decoder cosine</p><table>{cells}</table></div></div>")
    parts.append("<h2>Top activations</h2>")
    parts += [context_html(c, collection, scale) for c in lc.top] or ["<p class='muted'>never fired</p>"]
    if any(lc.quantiles):
        edges_q = lc.quantile_edges
        for b in range(len(lc.quantiles) - 1, -1, -1):
            if not lc.quantiles[b]:
                continue
            rng = f"{fmt(edges_q[b])} to {fmt(edges_q[b + 1])}" if edges_q else ""
            share = 1 / len(lc.quantiles)
            parts.append(
                f"<h2>Quantile {b + 1} of {len(lc.quantiles)}: {rng} <span class='muted'>(~{share:.0%} of fired tokens)</span></h2>"
            )
            parts += [context_html(c, collection, scale) for c in lc.quantiles[b]]
    return _page(f"latent {latent}", "".join(parts))


# ---------------------------------------------------------------------------- Neuronpedia
def _centres(edges: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in zip(edges, edges[1:])]


def _r(xs: list[float]) -> list[float]:
    return [round(float(x), 4) for x in xs]


def neuronpedia_batches(collection: ContextCollection, data: dict[str, Any], model_id: str, sae_set: str) -> list[dict]:
    """Neuronpedia dashboard batches (`model_id`, `layer`, `sae_set`, `features`), the keys
    SAEDashboard's exporter writes. `correlated_features_*` hold the nearest latents by decoder
    cosine; DFA, neuron alignment and per-token logit effects are not computed (left empty)."""
    layer = int(m.group(1)) if (m := re.search(r"\.(\d+)(?:\.|:|$)", collection.hookpoint)) else 0
    meta = collection.metadata
    features = []
    for latent, lc in collection.latents.items():
        d = data["latents"][latent]
        lens = d["logit_lens"] or {"promoted": [], "suppressed": [], "histogram": {"edges": [], "counts": []}}

        def acts(ctxs: list[Context], lo: float, hi: float, contains: float) -> list[dict]:
            return [
                {
                    "bin_min": lo,
                    "bin_max": hi,
                    "bin_contains": contains,
                    "tokens": collection.text(c.token_ids),
                    "values": _r(c.values),
                }
                for c in ctxs
            ]

        activations = acts(lc.top, -1, round(lc.max_value, 4), -1)
        for b, group in enumerate(lc.quantiles):
            if group and lc.quantile_edges:
                activations += acts(
                    group,
                    round(lc.quantile_edges[b], 4),
                    round(lc.quantile_edges[b + 1], 4),
                    round(1 / len(lc.quantiles), 4),
                )
        features.append(
            {
                "feature_index": latent,
                "neg_str": [t for t, _ in lens["suppressed"]],
                "neg_values": _r([v for _, v in lens["suppressed"]]),
                "pos_str": [t for t, _ in lens["promoted"]],
                "pos_values": _r([v for _, v in lens["promoted"]]),
                "frac_nonzero": lc.density,
                "freq_hist_data_bar_values": _r(_centres(lc.value_histogram.edges)),
                "freq_hist_data_bar_heights": lc.value_histogram.counts,
                "logits_hist_data_bar_values": _r(_centres(lens["histogram"]["edges"])),
                "logits_hist_data_bar_heights": lens["histogram"]["counts"],
                "correlated_features_indices": [j for j, _ in d["neighbours"]],
                "correlated_features_l1": _r([c for _, c in d["neighbours"]]),
                "neuron_alignment_indices": [],
                "neuron_alignment_values": [],
                "decoder_weights_dist": [],
                "n_prompts_total": collection.n_rows,
                "n_tokens_in_prompt": int(meta.get("context_size") or 0),
                "dataset": str(meta.get("data", "")),
                "activations": activations,
            }
        )
    return [
        {"model_id": model_id, "layer": layer, "sae_set": sae_set, "features": features[i : i + NP_BATCH]}
        for i in range(0, max(len(features), 1), NP_BATCH)
    ]


# ---------------------------------------------------------------------------- site
def write_dashboard(
    collection: ContextCollection,
    sae,
    model: torch.nn.Module | None,
    out: str | Path,
    tokenizer=None,
    sites: dict[str, list[str]] | None = None,
    title: str = "saelab feature dashboard",
    n_logit: int = 10,
    n_neighbours: int = 10,
) -> dict[str, Any]:
    """Write the site, `contexts.json` (the collection) and `neuronpedia/batch-N.json` under `out`."""
    out = Path(out)
    data = dashboard_data(collection, sae, model, tokenizer, n_logit, n_neighbours, sites)
    latents = list(collection.latents)
    with_pages = set(latents)
    write_text(out / "index.html", index_html(collection, data, title))
    for i, latent in enumerate(latents):
        nav = (latents[i - 1] if i else None, latents[i + 1] if i + 1 < len(latents) else None)
        write_text(out / "latents" / f"{latent}.html", latent_html(latent, collection, data, with_pages, nav))
    collection.save(out / "contexts.json")
    meta = collection.metadata
    model_id = re.sub(r"[^A-Za-z0-9._-]+", "-", str(meta.get("model", "model"))).strip("-") or "model"
    batches = neuronpedia_batches(collection, data, model_id, f"saelab-{collection.hookpoint}")
    for i, batch in enumerate(batches):
        write_text(out / "neuronpedia" / f"batch-{i}.json", json.dumps(batch) + "\n")
    summary = {k: v for k, v in data.items() if k != "latents"}
    write_json(out / "dashboard.json", {**summary, "latents": data["latents"]})
    return {**summary, "pages": len(latents), "neuronpedia_batches": len(batches)}


__all__ = ["dashboard_data", "neuronpedia_batches", "sites_from_metadata", "write_dashboard"]
