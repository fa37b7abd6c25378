"""Feature inspection: what makes each latent fire, how often, and what it writes to the logits.

For each chosen latent: its firing density, its top-activating contexts (a window of tokens
around the maximum, with the latent's activation on every token), and a logit lens of its
decoder direction through the final norm and the unembedding (`logit_lens`): the tokens it
promotes and suppresses when added to the residual stream. Results are plain dicts (saved as
JSON) and render as a text or HTML report.
"""

from __future__ import annotations

import html
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.models import hooks


@torch.no_grad()
def inspect_latents(
    sae,
    model: torch.nn.Module,
    tokenizer,
    hookpoint: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    latents: list[int] | None = None,
    n_latents: int = 20,
    top_k: int = 8,
    window: int = 12,
    specials: torch.Tensor | None = None,
    n_logit_tokens: int = 10,
) -> dict[str, Any]:
    """Scan `batches` of (input_ids, attention_mask) and describe `latents` (default: the
    `n_latents` most frequently firing ones). Contexts come from the streaming collector
    (`saelab.reading.contexts`): `window` tokens of context about the peak, fewer after it."""
    from saelab.reading.contexts import collect_contexts

    if latents is not None:
        bad = [i for i in latents if not 0 <= i < sae.cfg.d_sae]
        if bad:
            raise ConfigError(f"latent {bad[0]} is out of range; this SAE has d_sae={sae.cfg.d_sae}")
    col = collect_contexts(
        sae,
        model,
        batches,
        hookpoint=hookpoint,
        tokenizer=tokenizer,
        specials=specials if specials is not None else torch.zeros(0, dtype=torch.int64),
        latents=latents,
        top_k=top_k,
        n_bins=0,
        window=window + window // 2 + 1,
        n_random=0,
        progress=False,
    )
    density = torch.tensor(col.density)
    if latents is None:
        latents = density.argsort(descending=True)[:n_latents].tolist()
    lens = logit_lens(model, sae.W_dec[latents], n_logit_tokens) if _unembedding(model) is not None else None
    out_latents = []
    for j, i in enumerate(latents):
        lc = col.latents[i]
        contexts = [
            {
                "row": c.doc,
                "position": c.position,
                "activation": c.value,
                "tokens": col.text(c.token_ids),
                "activations": [round(a, 4) for a in c.values],
                "max_index": c.peak,
            }
            for c in lc.top
        ]
        entry: dict[str, Any] = {
            "latent": i,
            "density": lc.density,
            "max_activation": lc.max_value,
            "top_contexts": contexts,
        }
        if lens is not None:
            entry["logit_lens"] = {
                "promoted": [[tokenizer.decode([t]), v] for t, v in zip(lens.top_ids[j], lens.top_values[j])],
                "suppressed": [[tokenizer.decode([t]), v] for t, v in zip(lens.bottom_ids[j], lens.bottom_values[j])],
            }
        out_latents.append(entry)
    fired = density * col.n_tokens
    return {
        "hookpoint": col.hookpoint,
        "tokens_scanned": col.n_tokens,
        "d_sae": col.d_sae,
        "dead_fraction": float((density == 0).double().mean()),
        "dense_fraction": float((density > 0.1).double().mean()),
        "mean_l0": float(fired.sum() / col.n_tokens),
        "latents": out_latents,
    }


# ---------------------------------------------------------------------------- logit lens
@dataclass
class LogitLens:
    """Per direction: the `k` most promoted and most suppressed token ids with their logits."""

    top_ids: list[list[int]]
    top_values: list[list[float]]
    bottom_ids: list[list[int]]
    bottom_values: list[list[float]]
    final_norm: str | None  # module path of the final norm the directions went through


_FINAL_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unembedding(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


@torch.no_grad()
def final_norm(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(path, module) of the norm whose output the unembedding reads; None when there is none.

    Found by running the model once on three tokens and comparing the unembedding's input with
    the output of every norm-like module (a module whose class name contains "Norm" and that has
    a `[d_model]` weight), so no table of architectures is needed; the last match wins.
    """
    if model in _FINAL_NORMS:
        return _FINAL_NORMS[model]
    unembed = _unembedding(model)
    if unembed is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding (get_output_embeddings); no logit lens")
    named = list(model.named_modules())
    head = next(name for name, m in named if m is unembed)
    width = unembed.weight.shape[1]
    norms = [
        name
        for name, m in named
        if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.shape == (width,)
    ]
    points = [hooks.Hookpoint(n) for n in norms] + [hooks.Hookpoint(head, "input")]
    device = unembed.weight.device
    ids = torch.tensor([[1, 2, 3]], device=device) % unembed.weight.shape[0]
    store = hooks.run(model, ids, points, torch.ones_like(ids), stop_early=False)
    read = store[points[-1].name]
    found = None
    for n in norms:
        out = store.get(n)
        if out is not None and out.shape[-1] == width and out.shape[-2] >= read.shape[-2]:
            if torch.equal(out[..., out.shape[-2] - read.shape[-2] :, :], read):
                found = (n, dict(named)[n])
    _FINAL_NORMS[model] = found
    return found


@torch.no_grad()
def lens_logits(model: torch.nn.Module, directions: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """Logits `[n, vocab]` that each residual direction (a row of `directions`) writes, read
    through the final norm and the unembedding; and the final norm's module path.

    A direction d added to the residual stream x reaches the unembedding as norm(x + d). For an
    RMSNorm, g * (x + d) / rms(x + d); for a LayerNorm, g * (x + d - mean) / std + b. The part
    that depends on d is g * d (RMSNorm) or g * (d - mean(d)) (LayerNorm) times a positive scale
    (1/rms, 1/std), which does not change the ranking of tokens. That part is computed without
    knowing which norm the model uses as norm(d) - norm(0): the norm applied to the direction
    alone minus its bias, which equals g * d / rms(d) or g * (d - mean d) / std(d) (Gemma's
    (1 + w) gain included). Each such vector is rescaled to unit length, like the unit decoder
    direction it came from, so logits are comparable across latents. Leaving the norm out (the
    usual d @ W_U^T) ranks tokens wrongly wherever the gain is far from uniform.
    """
    unembed = _unembedding(model)
    W = unembed.weight.detach()
    d = directions.detach().to(W.device, torch.float32)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    found = final_norm(model)
    if found is not None:
        norm = found[1]
        dtype = norm.weight.dtype
        u = (norm(d.to(dtype)) - norm(torch.zeros_like(d[:1], dtype=dtype))).float()
        d = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return d @ W.float().t(), found[0] if found is not None else None


@torch.no_grad()
def logit_lens(model: torch.nn.Module, directions: torch.Tensor, k: int = 10, chunk: int = 256) -> LogitLens:
    """The `k` most promoted and suppressed tokens of each direction (see `lens_logits`), in
    chunks of `chunk` directions so `[chunk, vocab]` is the largest tensor made."""
    out = LogitLens([], [], [], [], None)
    for i in range(0, directions.shape[0], chunk):
        logits, out.final_norm = lens_logits(model, directions[i : i + chunk])
        top, bottom = logits.topk(k), logits.topk(k, largest=False)
        out.top_ids += top.indices.tolist()
        out.top_values += top.values.tolist()
        out.bottom_ids += bottom.indices.tolist()
        out.bottom_values += bottom.values.tolist()
    return out


def _show(tok: str) -> str:
    return tok.replace("\n", "\\n")


def text_report(result: dict[str, Any]) -> str:
    lines = [
        f"Feature inspection at {result['hookpoint']}: {result['tokens_scanned']} tokens, "
        f"L0 {result['mean_l0']:.1f}, dead {result['dead_fraction']:.1%}, dense {result['dense_fraction']:.1%}",
        "",
    ]
    for e in result["latents"]:
        lines.append(f"latent {e['latent']}: density {e['density']:.4f}, max activation {e['max_activation']:.3g}")
        if "logit_lens" in e:
            lines.append("  promotes:   " + " ".join(repr(t) for t, _ in e["logit_lens"]["promoted"]))
            lines.append("  suppresses: " + " ".join(repr(t) for t, _ in e["logit_lens"]["suppressed"]))
        for c in e["top_contexts"]:
            toks = [(f"[[{_show(t)}]]" if j == c["max_index"] else _show(t)) for j, t in enumerate(c["tokens"])]
            lines.append(f"  {c['activation']:8.3f}  {''.join(toks)}")
        lines.append("")
    return "\n".join(lines)


def html_report(result: dict[str, Any]) -> str:
    """One page: every token of a context shaded by the latent's activation (hover for the value)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>saelab feature inspection</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}.ctx{font-family:monospace;"
        "white-space:pre-wrap;margin:.2em 0}.tok{border-radius:2px}.lens{color:#555;font-size:90%}</style>",
        f"<h1>Feature inspection: {html.escape(result['hookpoint'])}</h1>",
        f"<p>{result['tokens_scanned']} tokens scanned; L0 {result['mean_l0']:.1f}; dead {result['dead_fraction']:.1%}; "
        f"dense {result['dense_fraction']:.1%}.</p>",
    ]
    for e in result["latents"]:
        parts.append(
            f"<h2>latent {e['latent']}</h2><p>density {e['density']:.4f}, max activation {e['max_activation']:.3g}</p>"
        )
        if "logit_lens" in e:
            promo = ", ".join(html.escape(repr(t)) for t, _ in e["logit_lens"]["promoted"])
            supp = ", ".join(html.escape(repr(t)) for t, _ in e["logit_lens"]["suppressed"])
            parts.append(f"<p class='lens'>promotes: {promo}<br>suppresses: {supp}</p>")
        peak = max(e["max_activation"], 1e-9)
        for c in e["top_contexts"]:
            spans = "".join(
                f"<span class='tok' title='{a:.3f}' style='background:rgba(255,120,0,{max(0.0, a) / peak:.2f})'>"
                f"{html.escape(t)}</span>"
                for t, a in zip(c["tokens"], c["activations"])
            )
            parts.append(f"<div class='ctx'>{c['activation']:7.3f} │ {spans}</div>")
    return "\n".join(parts) + "\n"
