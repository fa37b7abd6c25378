"""Files of a crosscoder diff: results.json, report.md, report.html and PNG plots.

- `relative_norms.png`: histogram of r = |d^ft| / (|d^base| + |d^ft|) over alive latents, with
  the category thresholds drawn;
- `shared_cosines.png`: histogram (log count) of the decoder cosine of shared latents;
- `nu_scatter.png`: nu_eps against nu_r for the exclusive latents, with the flag thresholds.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from saelab.diffing.crosscoder import CATEGORIES, DiffResult
from saelab.io.atomic import ensure_folder, save_figure, write_json, write_text
from saelab.report import markdown_table

PLOTS = ("relative_norms.png", "shared_cosines.png", "nu_scatter.png")
EXCLUSIVE_COLUMNS = [
    "latent",
    "category",
    "r",
    "fires_joint",
    "fires_base",
    "fires_ft",
    "nu_r",
    "nu_eps",
    "complete_shrinkage",
    "latent_decoupling",
]


def _alive(result: DiffResult) -> list[int]:
    return [j for j, p in enumerate(result.firing["joint"]) if p > 0]


def plot_relative_norms(result: DiffResult, path: Path) -> None:
    from saelab.plotting import new_figure, plt

    t = result.thresholds
    fig, axes = new_figure(size=(6.0, 4.0))
    ax = axes[0, 0]
    r = [result.relative_norms[j] for j in _alive(result)]
    ax.hist(r, bins=50, range=(0, 1), color="#4477aa")
    for x in (t["base_max"], *t["shared"], t["ft_min"]):
        ax.axvline(x, color="#999999", linestyle="--", linewidth=0.8)
    ax.set_xlabel("relative decoder norm r = |d_ft| / (|d_base| + |d_ft|)")
    ax.set_ylabel("alive latents")
    ax.set_title("base-only <- r -> fine-tune-only")
    save_figure(fig, path)
    plt.close(fig)


def plot_shared_cosines(result: DiffResult, path: Path) -> None:
    from saelab.plotting import new_figure, plt

    fig, axes = new_figure(size=(6.0, 4.0))
    ax = axes[0, 0]
    alive = set(_alive(result))
    cos = [
        c
        for j, (c, k) in enumerate(zip(result.decoder_cosines, result.categories, strict=True))
        if k == "shared" and j in alive
    ]
    if cos:
        ax.hist(cos, bins=40, range=(-1, 1), color="#228833", log=True)
    ax.set_xlabel("cosine(d_base, d_ft) of shared latents")
    ax.set_ylabel("latents (log)")
    save_figure(fig, path)
    plt.close(fig)


def plot_nu(result: DiffResult, path: Path) -> None:
    from saelab.plotting import new_figure, plt

    fig, axes = new_figure(size=(5.5, 5.0))
    ax = axes[0, 0]
    s = result.scaling
    if s is not None:
        for cat, color in (("ft_only", "#cc3311"), ("base_only", "#0077bb")):
            pts = [
                (r, e)
                for r, e, c in zip(s.nu_r, s.nu_eps, s.category, strict=True)
                if c == cat and math.isfinite(r) and math.isfinite(e)
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=12, color=color, label=cat)
        ax.legend()
    ax.axvline(result.thresholds["nu_r"], color="#999999", linestyle="--", linewidth=0.8)
    ax.axhline(result.thresholds["nu_eps"], color="#999999", linestyle="--", linewidth=0.8)
    ax.set_xlabel("nu_r (Latent Decoupling when high)")
    ax.set_ylabel("nu_eps (Complete Shrinkage when high)")
    save_figure(fig, path)
    plt.close(fig)


def _summary_rows(result: DiffResult) -> list[dict[str, Any]]:
    rows = [{"category": c, "latents": result.counts[c]} for c in CATEGORIES]
    rows.append({"category": "dead (never fired)", "latents": result.dead})
    return rows


def _flag_counts(result: DiffResult) -> dict[str, int]:
    s = result.scaling
    if s is None:
        return {"complete_shrinkage": 0, "latent_decoupling": 0, "neither": 0}
    both = list(zip(s.complete_shrinkage, s.latent_decoupling, strict=True))
    return {
        "complete_shrinkage": sum(a for a, _ in both),
        "latent_decoupling": sum(b for _, b in both),
        "neither": sum(not a and not b for a, b in both),
    }


def report_markdown(result: DiffResult, title: str = "Crosscoder diff") -> str:
    t = result.thresholds
    sc = result.shared_cosine
    flags = _flag_counts(result)
    cos = f"mean {sc['mean']:.3f}, median {sc['median']:.3f} over {sc['n']} shared latents" if sc.get("n") else "none"
    lines = [
        f"# {title}",
        "",
        f"Base site `{result.sites['base']}`, fine-tuned site `{result.sites['ft']}`; {result.tokens} held-out tokens.",
        "",
        f"Relative decoder norm r = |d_ft| / (|d_base| + |d_ft|) in the training space (each model at mean norm "
        f"sqrt(d)): base-only r < {t['base_max']}, fine-tune-only r > {t['ft_min']}, shared "
        f"{t['shared'][0]} <= r <= {t['shared'][1]}; counts over latents that fired.",
        "",
        markdown_table(_summary_rows(result), ["category", "latents"]),
        f"Decoder cosine of shared latents: {cos}.",
        "",
        "## Latent Scaling of the exclusive latents",
        "",
        "beta = d^T sum_n f_n y_n / (|d|^2 sum_n f_n^2) over the tokens where a latent fires, d its own model's "
        "decoder part; nu = beta(other model) / beta(own model), for y = the reconstruction by the latents "
        "(nu_r) and y = the error with the latent's own contribution put back (nu_eps). A truly exclusive "
        f"latent has nu ~ 0. Flags: Complete Shrinkage nu_eps > {t['nu_eps']}: {flags['complete_shrinkage']}; "
        f"Latent Decoupling nu_r > {t['nu_r']}: {flags['latent_decoupling']}; neither: {flags['neither']}.",
        "",
    ]
    rows = result.exclusive()
    lines.append(markdown_table(rows, EXCLUSIVE_COLUMNS) if rows else "No exclusive latents.\n")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in PLOTS) + ".", ""]
    return "\n".join(lines)


def _html_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(result: DiffResult, title: str = "Crosscoder diff") -> str:
    t = result.thresholds
    flags = _flag_counts(result)
    sc = result.shared_cosine
    cos = f"mean {sc['mean']:.3f}, median {sc['median']:.3f} over {sc['n']} shared latents" if sc.get("n") else "none"
    rows = result.exclusive()
    esc = html.escape
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "img{max-width:32%}</style></head><body>"
        f"<h1>{esc(title)}</h1>"
        f"<p>Base site <code>{esc(result.sites['base'])}</code>, fine-tuned site <code>{esc(result.sites['ft'])}</code>; "
        f"{result.tokens} held-out tokens. Thresholds: base-only r &lt; {t['base_max']}, fine-tune-only r &gt; "
        f"{t['ft_min']}, shared {t['shared'][0]}&ndash;{t['shared'][1]}.</p>"
        + _html_table(_summary_rows(result), ["category", "latents"])
        + f"<p>Decoder cosine of shared latents: {esc(cos)}.</p>"
        + "".join(f"<img src='{p}' alt='{p}'>" for p in PLOTS)
        + "<h2>Latent Scaling of the exclusive latents</h2>"
        f"<p>Complete Shrinkage (nu_eps &gt; {t['nu_eps']}): {flags['complete_shrinkage']}; Latent Decoupling "
        f"(nu_r &gt; {t['nu_r']}): {flags['latent_decoupling']}; neither: {flags['neither']}.</p>"
        + (_html_table(rows, EXCLUSIVE_COLUMNS) if rows else "<p>No exclusive latents.</p>")
        + "</body></html>"
    )


def write_report(result: DiffResult, out: str | Path, title: str = "Crosscoder diff") -> dict[str, Path]:
    """Write results.json, report.md, report.html and the plots into `out`; returns their paths."""
    out = ensure_folder(out, "report folder")
    paths = {name: out / name for name in ("results.json", "report.md", "report.html", *PLOTS)}
    write_json(paths["results.json"], _finite_or_null(result.as_dict()))
    write_text(paths["report.md"], report_markdown(result, title))
    write_text(paths["report.html"], report_html(result, title))
    plot_relative_norms(result, paths["relative_norms.png"])
    plot_shared_cosines(result, paths["shared_cosines.png"])
    plot_nu(result, paths["nu_scatter.png"])
    return paths


def _finite_or_null(value):
    """NaN and infinities as JSON null (bare NaN is not JSON): an undefined ratio, e.g. a nu whose
    latent never fires in one model, reads as missing rather than breaking strict parsers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value
