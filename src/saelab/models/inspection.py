"""Feature inspection: what makes each latent fire, how often, and what it writes to the logits.

For each chosen latent: its firing density, its top-activating contexts (a window of tokens
around the maximum, with the latent's activation on every token), and a logit lens of its
decoder direction, W_U d_i: the tokens it promotes and suppresses when added to the residual
stream (read through the unembedding only; the final norm's gain is left out, as is usual).
Results are plain dicts (saved as JSON) and render as a text or HTML report.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.models import hooks
from saelab.models.text import keep_mask


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
    `n_latents` most frequently firing ones)."""
    from saelab.evals.downstream import check_width

    hp = hooks.resolve(model, hookpoint)[0]
    check_width(model, hp, sae.cfg.d_in)
    device = next(model.parameters()).device
    d_sae = sae.cfg.d_sae
    fires = torch.zeros(d_sae, dtype=torch.int64)
    n_tokens = 0
    best_val = torch.full((top_k, d_sae), -float("inf"))
    best_row = torch.full((top_k, d_sae), -1, dtype=torch.int64)
    rows_ids, rows_mask = [], []

    def encode_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = hooks.run(model, ids.to(device), [hp], mask.to(device))[hp.name]
        keep = keep_mask(ids, mask, specials)
        f = torch.zeros(*ids.shape, d_sae)
        f[keep] = sae.encode(acts[keep.to(acts.device)].float()).cpu()
        return f, keep

    for ids, mask in batches:
        f, keep = encode_rows(ids, mask)
        fires += (f[keep] > 0).sum(0)
        n_tokens += int(keep.sum())
        row_max = f.max(1).values  # [B, d_sae]
        offset = len(rows_ids) and sum(r.shape[0] for r in rows_ids)
        rows_ids.append(ids)
        rows_mask.append(mask)
        vals = torch.cat([best_val, row_max])
        idx = torch.cat([best_row, torch.arange(offset, offset + ids.shape[0])[:, None].expand(-1, d_sae)])
        top = vals.topk(top_k, dim=0)
        best_val, best_row = top.values, idx.gather(0, top.indices)
    if n_tokens == 0:
        raise ConfigError("no tokens to inspect: every position was padding or a special token")
    all_ids, all_mask = torch.cat(rows_ids), torch.cat(rows_mask)
    density = fires.double() / n_tokens
    if latents is None:
        latents = density.argsort(descending=True)[:n_latents].tolist()
    for i in latents:
        if not 0 <= i < d_sae:
            raise ConfigError(f"latent {i} is out of range; this SAE has d_sae={d_sae}")
    unembed = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") else None
    out_latents = []
    for i in latents:
        contexts = []
        for k in range(top_k):
            r, v = int(best_row[k, i]), float(best_val[k, i])
            if r < 0 or v <= 0:
                continue
            f, _ = encode_rows(all_ids[r : r + 1], all_mask[r : r + 1])
            acts = f[0, :, i]
            pos = int(acts.argmax())
            lo, hi = max(0, pos - window), min(int(all_mask[r].sum()), pos + window // 2 + 1)
            contexts.append(
                {
                    "row": r,
                    "position": pos,
                    "activation": v,
                    "tokens": [tokenizer.decode([t]) for t in all_ids[r, lo:hi].tolist()],
                    "activations": [round(float(a), 4) for a in acts[lo:hi]],
                    "max_index": pos - lo,
                }
            )
        entry: dict[str, Any] = {
            "latent": i,
            "density": float(density[i]),
            "max_activation": max((c["activation"] for c in contexts), default=0.0),
            "top_contexts": contexts,
        }
        if unembed is not None:
            logits = unembed.detach().float() @ sae.W_dec[i].detach().float().to(unembed.device)
            top, bottom = logits.topk(n_logit_tokens), (-logits).topk(n_logit_tokens)
            entry["logit_lens"] = {
                "promoted": [[tokenizer.decode([int(t)]), float(v)] for v, t in zip(top.values, top.indices)],
                "suppressed": [[tokenizer.decode([int(t)]), float(-v)] for v, t in zip(bottom.values, bottom.indices)],
            }
        out_latents.append(entry)
    return {
        "hookpoint": hp.name,
        "tokens_scanned": n_tokens,
        "d_sae": d_sae,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((density > 0.1).double().mean()),
        "mean_l0": float(fires.sum() / n_tokens),
        "latents": out_latents,
    }


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
