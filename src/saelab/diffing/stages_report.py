"""Files of a stage-wise model diff: results.json, report.md, report.html and PNG plots.

Per transition T (S->D, S->M, D->F_via_D, M->F_via_M; file names spell `->` as `_to_`):

- `scatter_T.png`: encoder cosine against decoder cosine of every latent alive in T's later
  stage, with the control's null drawn on both axes (below and left of it: rotated beyond the control);
- `hist_T.png`: histograms of T's cosines and of the control's (S->control), encoder and
  decoder side by side, with the null marked;

and `paths.png`: decoder cos(S->D) against cos(D->F_via_D), and cos(S->M) against cos(M->F_via_M),
the paper's reading (latents low on the model axis rotated when the model changed).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from saelab.diffing.report import _finite_or_null, _html_table
from saelab.diffing.stages import (
    CONTROL,
    DATA_TRANSITIONS,
    KINDS,
    MODEL_TRANSITIONS,
    STAGE_SOURCE,
    TRANSITIONS,
    StagesResult,
)
from saelab.io.atomic import ensure_folder, save_figure, write_json, write_text
from saelab.report import markdown_table

READ = (*DATA_TRANSITIONS, *MODEL_TRANSITIONS)
RANKED_COLUMNS = ["latent", "decoder", "encoder", "control", "beyond_null", "control_fraction", "fires", "top context"]


def file_stem(transition: str) -> str:
    return transition.replace("->", "_to_")


def plot_names() -> list[str]:
    names = [f"{kind}_{file_stem(t)}.png" for t in READ for kind in ("scatter", "hist")]
    return [*names, "paths.png"]


def _alive_cosines(result: StagesResult, transition: str) -> dict[str, torch.Tensor]:
    a, b = TRANSITIONS[transition]
    cos = result.cosines(a, b)
    keep = result.alive(b)
    return {k: cos[k][keep & torch.isfinite(cos[k])] for k in KINDS}


def plot_scatter(result: StagesResult, transition: str, path: Path) -> None:
    from saelab.plotting import new_figure, plt

    fig, axes = new_figure(size=(5.0, 4.5))
    ax = axes[0, 0]
    a, b = TRANSITIONS[transition]
    cos = result.cosines(a, b)
    keep = result.alive(b) & torch.isfinite(cos["encoder"]) & torch.isfinite(cos["decoder"])
    ax.scatter(cos["encoder"][keep].numpy(), cos["decoder"][keep].numpy(), s=8, color="#4477aa", alpha=0.7)
    ax.axvline(result.null("encoder"), color="#cc3311", linestyle="--", linewidth=0.8, label="control null")
    ax.axhline(result.null("decoder"), color="#cc3311", linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"encoder cosine {a} -> {b}")
    ax.set_ylabel(f"decoder cosine {a} -> {b}")
    ax.set_title(f"{transition}: {int(keep.sum())} latents (low = rotated)")
    ax.legend(loc="lower right")
    save_figure(fig, path)
    plt.close(fig)


def plot_hist(result: StagesResult, transition: str, path: Path) -> None:
    from saelab.plotting import new_figure, plt

    fig, axes = new_figure(ncols=2, size=(5.0, 4.0))
    now, control = _alive_cosines(result, transition), _alive_cosines(result, CONTROL)
    for ax, kind in zip(axes[0], KINDS, strict=True):
        lo = float(
            min(now[kind].min() if now[kind].numel() else 1.0, control[kind].min() if control[kind].numel() else 1.0)
        )
        bins = torch.linspace(min(lo, 0.0), 1.0, 41).numpy()
        ax.hist(control[kind].numpy(), bins=bins, color="#999999", alpha=0.6, label=f"control ({CONTROL})", log=True)
        ax.hist(now[kind].numpy(), bins=bins, color="#4477aa", alpha=0.6, label=transition, log=True)
        ax.axvline(result.null(kind), color="#cc3311", linestyle="--", linewidth=0.8, label="null")
        ax.set_xlabel(f"{kind} cosine")
        ax.set_ylabel("latents (log)")
        ax.legend(loc="upper left", fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def plot_paths(result: StagesResult, path: Path) -> None:
    from saelab.plotting import new_figure, plt

    fig, axes = new_figure(ncols=2, size=(5.0, 4.5))
    null = result.null("decoder")
    for ax, (first, second) in zip(axes[0], (("S->D", "D->F_via_D"), ("S->M", "M->F_via_M")), strict=True):
        x, y = result.transitions[first]["decoder"], result.transitions[second]["decoder"]
        keep = result.alive(TRANSITIONS[second][1]) & torch.isfinite(x) & torch.isfinite(y)
        ax.scatter(x[keep].numpy(), y[keep].numpy(), s=8, color="#228833", alpha=0.7)
        ax.axvline(null, color="#cc3311", linestyle="--", linewidth=0.8)
        ax.axhline(null, color="#cc3311", linestyle="--", linewidth=0.8)
        ax.set_xlabel(f"decoder cosine {first}")
        ax.set_ylabel(f"decoder cosine {second}")
    save_figure(fig, path)
    plt.close(fig)


def _ranked_rows(result: StagesResult, transition: str, top: int) -> list[dict[str, Any]]:
    contexts = result.contexts.get(transition, {})
    rows = []
    for row in result.ranked(transition, "decoder", top):
        found = contexts.get(row["latent"]) or []
        first = found[0] if found else {}
        shown = first.get("text") if "text" in first else (f"row {first['row']}" if "row" in first else "")
        if "peak_token" in first:
            shown = f"[{first['peak_token']}] {shown}"
        rows.append({**row, "top context": shown})
    return rows


def _stage_rows(result: StagesResult) -> list[dict[str, Any]]:
    return [
        {
            "stage": s,
            "model/data": STAGE_SOURCE[s],
            "tokens": result.tokens.get(s, 0),
            "final FVU": result.final_fvu.get(s, float("nan")),
            "alive": int(result.alive(s).sum()),
        }
        for s in result.saes
    ]


def _summary_rows(result: StagesResult) -> list[dict[str, Any]]:
    return [{"transition": name, **row} for name, row in result.summary().items()]


def _intro(result: StagesResult) -> str:
    return (
        f"S trained {result.steps} steps on base model, base data; every later stage {result.stage_steps} steps, "
        "warm-started from its parent at S's input scale, without resampling. Cosines per latent between a "
        "stage and the next, of encoder columns and decoder rows (low = rotated). Null: the "
        f"{result.null_quantile:g} quantile of the control's cosines (S continued on base model, base data) "
        f"over latents that fired at least {result.min_fires} times in the control: encoder "
        f"{result.null('encoder'):.4f}, decoder {result.null('decoder'):.4f}. Model transitions: "
        f"{', '.join(MODEL_TRANSITIONS)}; data transitions: {', '.join(DATA_TRANSITIONS)}."
    )


def report_markdown(result: StagesResult, title: str = "Stage-wise model diff", top: int = 20) -> str:
    lines = [f"# {title}", "", _intro(result), "", markdown_table(_stage_rows(result)), ""]
    lines += ["## Rotation per transition", "", markdown_table(_summary_rows(result)), ""]
    for name in READ:
        rows = _ranked_rows(result, name, top)
        lines += [f"## {name}: latents rotating beyond the control (decoder)", ""]
        lines.append(markdown_table(rows, RANKED_COLUMNS) if rows else "None.\n")
        lines.append("")
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in plot_names()) + ".", ""]
    return "\n".join(lines)


def report_html(result: StagesResult, title: str = "Stage-wise model diff", top: int = 20) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>body{{font-family:sans-serif;max-width:80em;margin:2em auto}}",
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}",
        "img{max-width:48%}</style></head><body>",
        f"<h1>{esc(title)}</h1><p>{esc(_intro(result))}</p>",
        _html_table(_stage_rows(result), ["stage", "model/data", "tokens", "final FVU", "alive"]),
        "<h2>Rotation per transition</h2>",
        _html_table(_summary_rows(result), list(_summary_rows(result)[0])),
    ]
    for name in READ:
        rows = _ranked_rows(result, name, top)
        parts.append(f"<h2>{esc(name)}: latents rotating beyond the control (decoder)</h2>")
        parts.append(_html_table(rows, RANKED_COLUMNS) if rows else "<p>None.</p>")
        stem = file_stem(name)
        parts.append(f"<img src='scatter_{stem}.png' alt='scatter {esc(name)}'><img src='hist_{stem}.png' alt='hist'>")
    parts.append("<h2>Paths</h2><img src='paths.png' alt='paths'></body></html>")
    return "".join(parts)


def write_stages_report(
    result: StagesResult, out: str | Path, title: str = "Stage-wise model diff", top: int = 20
) -> dict[str, Path]:
    """Write results.json, report.md, report.html and the plots into `out`; returns their paths."""
    out = ensure_folder(out, "report folder")
    paths = {name: out / name for name in ("results.json", "report.md", "report.html", *plot_names())}
    write_json(paths["results.json"], _finite_or_null(result.as_dict(top)))
    write_text(paths["report.md"], report_markdown(result, title, top))
    write_text(paths["report.html"], report_html(result, title, top))
    for name in READ:
        plot_scatter(result, name, paths[f"scatter_{file_stem(name)}.png"])
        plot_hist(result, name, paths[f"hist_{file_stem(name)}.png"])
    plot_paths(result, paths["paths.png"])
    return paths
