"""Matplotlib set-up shared by every report (a headless backend, one figure style) and the plots
several reports draw."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # reports are written to files; never needs a display

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "new_figure", "plot_frontier"]


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 4.0)):
    """A figure with `nrows x ncols` axes, each `size` inches."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


FVU_FLOOR = 1e-3  # dense baselines (PCA with L0 = d_in) reach ~1e-14 and would flatten the plot


def plot_frontier(
    records: list[dict], path, title: str, true_l0: float | None = None, l0_label: str = "true L0"
) -> None:
    """FVU vs L0 and true features recovered vs L0, one line per architecture through its sweep
    (records are evaluation records with `architecture`, `l0`, `fvu` and, with ground truth,
    `recovered_fraction`); `true_l0` marks the world's true L0 (or the L0 `l0_label` names)."""
    from saelab.io.atomic import save_figure

    fig, axes = new_figure(ncols=2, size=(6.0, 4.5))
    by_arch: dict[str, list[dict]] = {}
    for r in records:
        by_arch.setdefault(r["architecture"], []).append(r)
    colours = plt.get_cmap("tab20").colors  # distinct colours for up to 20 architectures
    for i, (arch, rs) in enumerate(sorted(by_arch.items())):
        rs = sorted(rs, key=lambda r: r["l0"])
        style = dict(color=colours[i % len(colours)], marker="os^D"[i // len(colours) % 4], label=arch)
        axes[0][0].plot([r["l0"] for r in rs], [max(r["fvu"], FVU_FLOOR) for r in rs], "-", **style)
        if "recovered_fraction" in rs[0]:
            axes[0][1].plot([r["l0"] for r in rs], [r["recovered_fraction"] for r in rs], "-", **style)
    axes[0][0].set(
        xlabel="L0 (active latents per token)",
        ylabel=f"FVU (lower is better; shown >= {FVU_FLOOR:g})",
        title=title,
        xscale="log",
        yscale="log",
    )
    axes[0][1].set(
        xlabel="L0",
        ylabel="true features recovered (cos >= 0.9)",
        title="ground-truth recovery",
        xscale="log",
        ylim=(0, 1.02),
    )
    for ax in axes[0]:
        if true_l0 is not None:
            ax.axvline(true_l0, ls="--", c="grey", lw=1, label=l0_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
