"""The report folder of `saelab bench toy`: results.json, report.md, report.html and PNG plots."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from saelab.io.atomic import save_figure, write_json, write_text
from saelab.report import _fmt, markdown_table
from saelab.sae.registry import get_class

LEADERBOARD = [
    "architecture",
    "setting",
    "l0",
    "fvu",
    "recovered_fraction",
    "mcc",
    "mean_matched_cosine",
    "shrinkage",
    "dead_fraction",
    "train_seconds",
]
PATHOLOGY = [
    "world",
    "architecture",
    "l0",
    "shrinkage",
    "feature_magnitude_ratio",
    "recovered_fraction",
    "composites_recovered",
    "absorption",
    "absorption_baseline",
    "absorbed_parents",
    "hedging",
    "splitting",
    "merging",
    "entity_recovered",
    "attribute_recovered",
]
L0_CHOICE = [
    "world",
    "architecture",
    "multiplier",
    "setting",
    "l0",
    "true_l0",
    "nth_decoder_projection",
    "merging",
    "recovered_fraction",
    "fvu",
]


def default_rows(records: list[dict]) -> list[dict]:
    """The default setting (multiplier 1) of each architecture, averaged over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if "error" not in r and r["multiplier"] == 1.0:
            groups.setdefault((r["world"], r["architecture"]), []).append(r)
    rows = []
    for (world, arch), rs in groups.items():
        row: dict[str, Any] = {"world": world, "architecture": arch, "setting": rs[0]["setting"], "seeds": len(rs)}
        for key in rs[0]:
            vals = [r.get(key) for r in rs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and key not in (
                "seed",
                "multiplier",
            ):
                row[key] = sum(vals) / len(vals)
        rows.append(row)
    return rows


# Numbers a matched-L0 row averages over seeds (and interpolates along a sweep).
MATCHED_METRICS = tuple(
    dict.fromkeys(
        m
        for m in LEADERBOARD + PATHOLOGY + L0_CHOICE
        if m not in ("world", "architecture", "setting", "multiplier", "true_l0")
    )
)


def matched_table_rows(records: list[dict]) -> list[dict]:
    """With matched_l0: one row per (world, architecture) at the matched L0, means over seeds,
    ranked, with the spread of the headline metrics as `mean ± std` cells."""
    from saelab.bench.matched import matched_rows, pm, rank

    rows = rank(matched_rows(records, by=("world", "architecture"), metrics=MATCHED_METRICS))
    for r in rows:
        r["seeds"] = r["n_seeds"]
        r["l0 (mean ± std)"] = pm(r, "l0", 2)
        r["recovered (mean ± std)"] = pm(r, "recovered_fraction")
        r["fvu (mean ± std)"] = pm(r, "fvu")
        r["converged"] = f"{r['converged_seeds']}/{r['n_seeds']}"
    return rows


MATCHED_BOARD = [
    "architecture",
    "method",
    "matched",
    "l0 (mean ± std)",
    "recovered (mean ± std)",
    "fvu (mean ± std)",
    "mcc",
    "shrinkage",
    "dead_fraction",
    "converged",
    "seeds",
]


def _columns(rows: list[dict], wanted: list[str]) -> list[str]:
    return [c for c in wanted if any(c in r for r in rows)]


def _html_table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_world(records: list[dict], world: str, path: Path) -> None:
    """The frontier plot of one world (true L0 marked)."""
    from saelab.plotting import plot_frontier

    rs = [r for r in records if r["world"] == world and "error" not in r]
    if rs:
        plot_frontier(rs, path, f"{world}: sparsity / fidelity", true_l0=rs[0]["true_l0"])


def plot_pathologies(rows: list[dict], path: Path) -> None:
    """A heat map of the pathology table (default settings): rows world/architecture, columns metrics."""
    import numpy as np

    from saelab.plotting import new_figure

    metrics = [
        "shrinkage",
        "absorption",
        "hedging",
        "splitting",
        "merging",
        "recovered_fraction",
        "composites_recovered",
        "mcc",
    ]
    if not rows:
        return
    labels = [f"{r['world']}/{r['architecture']}" for r in rows]
    data = np.array([[r.get(m, np.nan) for m in metrics] for r in rows], dtype=float)
    fig, axes = new_figure(size=(7.0, 0.28 * len(rows) + 1.5))
    ax = axes[0][0]
    ax.imshow(np.nan_to_num(data, nan=0.0), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if data[i, j] < 0.5 else "black",
                )
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_title("pathologies at the default setting (blank: does not apply)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


COMPOSITES = [
    "world",
    "architecture",
    "seeds",
    "recovered_fraction",
    "composites_recovered",
    "absorbing_latents",
    "absorbed_parents",
    "absorption",
    "absorption_baseline",
]


def composite_section(rows: list[dict], references: list[dict]) -> tuple[str, str, list[dict], list[str]] | None:
    """Features against parent + child composites on each hierarchy world, the trained SAEs'
    default settings followed by the hand-built reference dictionaries (averaged over seeds)."""
    hier = sorted({r["world"] for r in references})
    if not hier:
        return None
    table, lines = [], []
    for w in hier:
        saes = [r for r in rows if r["world"] == w and "composites_recovered" in r]
        refs = default_rows(
            [
                {**r, "architecture": f"({r['dictionary']} dictionary)", "multiplier": 1.0, "setting": None}
                for r in references
                if r["world"] == w
            ]
        )
        table += saes + refs
        if saes:
            mean = lambda key: sum(r[key] for r in saes) / len(saes)  # noqa: E731
            base = {r["architecture"]: r for r in refs}
            lines.append(
                f"{w}: features recovered {mean('recovered_fraction'):.2f}, composites recovered "
                f"{mean('composites_recovered'):.2f} (mean of {len(saes)} dictionaries); baselines (features / composites): "
                + ", ".join(
                    f"{name} dictionary {base[f'({name} dictionary)']['recovered_fraction']:.2f} / "
                    f"{base[f'({name} dictionary)']['composites_recovered']:.2f}"
                    for name in ("features", "composites", "random")
                )
                + "."
            )
    text = (
        "A composite is unit(parent + child), what a child latent decodes once it has absorbed its parent; "
        "composites recovered is the fraction matched one-to-one to a latent at decoder cosine >= 0.9, "
        "as recovered_fraction is for features. absorbing_latents: live latents closer to a composite than "
        "to any feature, whose encoder reads the child more than the parent; absorbed_parents: parents "
        "with no latent of their own, only absorbing ones. Reference rows are hand-built: the true "
        "features, the composites (encoder reading the child) and random unit rows.\n\n" + "\n".join(lines)
    )
    return "Parent + child composites", text, table, _columns(table, COMPOSITES)


def write_report(result, cfg, out: Path) -> None:
    records = result.records
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", [{k: v for k, v in r.items() if k != "traceback"} for r in records])
    if result.tms is not None:
        write_json(out / "tms.json", result.tms)
    if result.references:
        write_json(out / "references.json", result.references)
    rows = matched_table_rows(records) if cfg.matched_l0 else default_rows(records)
    worlds = [w for w in cfg.worlds if any(r["world"] == w for r in records)]
    plots = []
    for w in worlds:
        plot_world(records, w, out / f"frontier_{w}.png")
        plots.append(f"frontier_{w}.png")
    plot_pathologies(rows, out / "pathologies.png")
    plots.append("pathologies.png")
    if result.tms is not None:
        plots.append("tms.png")

    from saelab.bench.toy import WORLDS

    sections: list[tuple[str, str, list[dict], list[str]]] = []
    for w in worlds:
        spec = {**WORLDS[w][1 if cfg.quick else 0]}
        true_l0 = next((r["true_l0"] for r in records if r["world"] == w), float("nan"))
        if cfg.matched_l0:
            board = [r for r in rows if r["world"] == w]
            target = board[0]["target_l0"] if board else float("nan")
            text = (
                f"World `{json.dumps(spec)}`, true L0 {true_l0:.2f}. Every architecture at L0 = {target:g} "
                "(method: k, target_l0, or a sweep interpolated in log L0; matched: L0 within 10% or "
                "bracketed on every seed), mean over seeds; matched rows first, by recovered fraction."
            )
            columns = MATCHED_BOARD
        else:
            board = sorted((r for r in rows if r["world"] == w), key=lambda r: (-r["recovered_fraction"], r["fvu"]))
            text = (
                f"World `{json.dumps(spec)}`, true L0 {true_l0:.2f}. "
                "Default setting of each architecture, sorted by recovered fraction."
            )
            columns = LEADERBOARD
        sections.append((f"Leaderboard: {w}", text, board, _columns(board, columns)))
    sections.append(
        (
            "Pathology table",
            ("At the matched L0 (means over seeds). " if cfg.matched_l0 else "Default settings. ")
            + "shrinkage is gamma* (< 1: shrinks); absorption is "
            "P(parent latent silent | child fires) with its baseline P(silent | parent alone), where a latent that "
            "absorbed a parent + child composite is never the parent's (a parent with only such latents is silent "
            "everywhere: both 1); composites_recovered and absorbed_parents are explained below; hedging is "
            "the child direction's excess cosine in the parent latent; splitting and merging are fractions "
            "of true features.",
            rows,
            _columns(rows, PATHOLOGY),
        )
    )
    composites = composite_section(rows, result.references)
    if composites is not None:
        sections.append(composites)
    l0_rows = [r for r in records if "error" not in r and get_class(r["architecture"]).sweep_kind == "count"]
    sections.append(
        (
            "Choosing L0",
            "Architectures whose sweep sets the active-latent count (k), across the sweep: the nth decoder projection "
            "(n = d_sae / 8) should fall towards the true L0 and flatten after it.",
            l0_rows,
            _columns(l0_rows, L0_CHOICE),
        )
    )
    errors = [r for r in records if "error" in r]
    if errors:
        sections.append(
            (
                "Runs that failed",
                "These architectures could not train on toy data as configured.",
                errors,
                ["world", "architecture", "multiplier", "error"],
            )
        )

    header = (
        f"{len(records)} runs, {len(worlds)} worlds, {'quick' if cfg.quick else 'full'} mode, "
        f"{cfg.steps} steps per SAE, seeds {cfg.seeds}, "
        f"{'matched L0' if cfg.matched_l0 else 'default settings'}; wall time {result.wall_seconds:.1f} s."
    )
    md = ["# saelab bench toy\n", header + "\n"]
    for title, text, rs, cols in sections:
        md += [f"## {title}\n", text + "\n", markdown_table(rs, cols)]
    md += ["## Plots\n", *[f"![{p}]({p})\n" for p in plots]]
    write_text(out / "report.md", "\n".join(md))
    body = [f"<h1>saelab bench toy</h1><p>{html.escape(header)}</p>"]
    for title, text, rs, cols in sections:
        body.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>{_html_table(rs, cols)}")
    body.append("<h2>Plots</h2>" + "".join(f'<p><img src="{p}" alt="{p}"></p>' for p in plots))
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
    )
    write_text(
        out / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'><title>saelab bench toy</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n",
    )
