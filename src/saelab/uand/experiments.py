"""The U-AND experiments behind `saelab uand EXPERIMENT`: each tests claims and writes a report.

An experiment is a function `(Scale, seed) -> Outcome`: measured results (plain dicts), claims
(each a measured boolean with the numbers behind it and the criterion, fixed before running),
figures and Markdown sections. `run_experiment` runs it for `Scale.seeds` consecutive seeds
and writes DIR/results.json (every seed's results, their mean and standard deviation), DIR/*.png
and DIR/report.md; a claim holds only if it holds in every seed. `all` runs every experiment
into DIR/<name>/ and adds a combined claim table.

Every AND result stands beside the linear floor (readout.linear_floor): the best read-out of
the raw input x with no hidden layer, exact for the task's loss. With exactly s inputs on, AND
is a linear threshold of x, so the floor is right on every output once thresholded, and a
hidden layer computes something only where its loss is below the floor's. Trained models and
constructions are scored on all C(m, s) inputs when that is cheap (`EXACT_OUTPUTS`), else on a
held-out sample.

`--quick` shrinks m, the d grid and the training steps so each experiment takes seconds; the
defaults (m = 100, d from 10 to 1000; `scale_m` at m = 1000) take 2 to 19 minutes of one core each
for 3 seeds (`scaling` and `constructions` the longest).
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saelab.errors import ConfigError
from saelab.io.atomic import save_figure, write_json, write_text
from saelab.plotting import new_figure, plt
from saelab.report import markdown_table
from saelab.uand.analysis import analyse
from saelab.uand.constructions import (
    calibrate,
    dense_binary_construction,
    frozen_model,
    hanni_construction,
    sign_product_readout,
    tune,
)
from saelab.uand.data import DataConfig, UANDTask, all_inputs
from saelab.uand.metrics import Metrics, evaluate
from saelab.uand.model import ModelConfig, TrainConfig, UANDModel, train
from saelab.uand.readout import collect_stats, linear_floor, solve_readout

# Score on every input when C(m, s) * C(m, 2) outputs are at most this many (a few seconds at d = 50).
EXACT_OUTPUTS = 30_000_000


@dataclass
class Scale:
    """Problem sizes; `quick` ones finish each experiment in seconds."""

    m: int
    s: int
    d_grid: list[int]
    d: int  # the single width used where one model is trained
    d_wide: int  # a wider layer, for read-outs of other truth tables (XOR needs more neurons than AND)
    steps: int
    batch_size: int
    n_eval: int
    n_fit: int  # samples for least-squares read-outs
    s_grid: list[int]
    m_grid: list[int]
    seeds: int = 3  # every experiment runs for this many consecutive seeds; claims must hold in all
    lr: float = 1e-2  # at base_width 50; R's lr is lr * 50 / d (muP, see model.py)
    # scale_m: one large-m run trained on the sampled-output loss and scored on every output
    m_big: int = 1000
    d_big: int = 100
    d_big_grid: list[int] = field(default_factory=lambda: [100, 1000])  # dense construction widths
    steps_big: int = 200
    batch_big: int = 64
    output_sample: int = 1024
    n_eval_big: int = 300

    @classmethod
    def make(cls, quick: bool) -> Scale:
        if quick:
            return cls(
                m=30,
                s=2,
                d_grid=[5, 10, 20, 40],
                d=20,
                d_wide=80,
                steps=300,
                batch_size=128,
                n_eval=1000,
                n_fit=20000,
                s_grid=[2, 3, 4],
                m_grid=[20, 30, 45],
                m_big=200,
                d_big=20,
                d_big_grid=[20, 200],
                steps_big=100,
                batch_big=64,
                output_sample=256,
                n_eval_big=200,
            )
        return cls(
            m=100,
            s=3,
            d_grid=[10, 20, 50, 100, 200, 500, 1000],
            d=50,
            d_wide=200,
            steps=1000,
            batch_size=256,
            n_eval=2000,
            n_fit=60000,
            s_grid=[2, 3, 5],
            m_grid=[50, 100, 150],
        )


@dataclass
class Claim:
    name: str
    statement: str
    criterion: str
    holds: bool
    numbers: dict


@dataclass
class Outcome:
    results: dict
    claims: list[Claim] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # file stem -> matplotlib figure (first seed's)
    sections: list[str] = field(default_factory=list)  # Markdown
    # (mean results, sd results) over seeds -> figures; replaces `figures` when set
    plot: Callable[[dict, dict], dict] | None = None


# ----------------------------------------------------------------------------- helpers


def _sample_set(task: UANDTask, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return task.sample(n, torch.Generator().manual_seed(10_000 + seed))


def exact_eval(task: UANDTask) -> bool:
    """Whether the test set is every input: exactly-s inputs and few enough outputs."""
    cfg = task.config
    return cfg.sparsity == "exact" and math.comb(cfg.m, cfg.s) * task.n_pairs <= EXACT_OUTPUTS


def _eval_set(task: UANDTask, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set: all C(m, s) inputs once each when cheap (exact metrics), else n fresh samples."""
    if not exact_eval(task):
        return _sample_set(task, n, seed)
    x = all_inputs(task.m, task.config.s)
    return x, task.encode(x, torch.Generator().manual_seed(10_000 + seed))


def _floor(task: UANDTask, loss: str = "balanced") -> Metrics:
    """Exact metrics of the linear floor of x for this task (its clean inputs; see module docstring)."""
    return linear_floor(task, loss).metrics


def _with_floor(row: dict, floor: Metrics) -> dict:
    """The floor's balanced MSE and class accuracies beside a row's, and the row's MSE over the floor's."""
    return {
        **row,
        "floor_mse": floor.balanced_mse,
        "floor_acc_pos": floor.acc_pos,
        "floor_acc_neg": floor.acc_neg,
        "over_floor": row["balanced_mse"] / max(floor.balanced_mse, 1e-12),
    }


def _first_below(ds: list[int], errs: list[float], floor: float) -> int | None:
    """The smallest d whose error is below the floor (None when none is)."""
    return next((d for d, e in zip(ds, errs) if e < floor), None)


def _train_eval(task: UANDTask, model_cfg: ModelConfig, scale: Scale, seed: int, val) -> tuple[UANDModel, Metrics]:
    model = UANDModel.for_task(task, model_cfg, seed=seed)
    train(model, task, TrainConfig(steps=scale.steps, batch_size=scale.batch_size, lr=scale.lr, seed=seed))
    return model, evaluate(model, task, *val)


def _row(metrics: Metrics, **keys) -> dict:
    m = metrics.to_dict()
    return {
        **keys,
        **{
            k: m[k]
            for k in (
                "balanced_mse",
                "mse_pos",
                "mse_neg",
                "max_abs",
                "acc_pos",
                "acc_neg",
                "cell_mse_mean",
                "worst_cell_acc",
            )
        },
    }


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def _band_plot(ax, rows, sd_rows, x, y, label=None, logx=True, logy=True):
    """Mean over seeds with a band of one standard deviation."""
    xs = [r[x] for r in rows]
    mean = torch.tensor([r[y] for r in rows])
    spread = torch.tensor([r.get(y) or 0.0 for r in sd_rows])
    ax.plot(xs, mean.tolist(), marker="o", label=label)
    ax.fill_between(xs, (mean - spread).clamp(min=1e-12).tolist(), (mean + spread).tolist(), alpha=0.25)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{y} (mean ± sd over seeds)")


def _plot_groups(stem: str, x: str, group: str, title: str, logx: bool = True) -> Callable[[dict, dict], dict]:
    """A plot of balanced MSE against `x`, one band per value of `group`, with the floor dashed."""

    def plot(mean: dict, sd: dict) -> dict:
        rows, spread = mean["rows"], sd["rows"]
        fig, axes = new_figure()
        ax = axes[0][0]
        for value in dict.fromkeys(r[group] for r in rows):
            pick = [k for k, r in enumerate(rows) if r[group] == value]
            _band_plot(ax, [rows[k] for k in pick], [spread[k] for k in pick], x, "balanced_mse", str(value), logx)
        ax.axhline(rows[0]["floor_mse"], color="k", linestyle="--", label="linear floor of x")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return {stem: fig}

    return plot


def _hanni_grid() -> list[float]:
    return [0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]


def _dense_bias_grid() -> list[float]:
    return [-2.5, -1.5, -1.0, -0.5, 0.0]


# ----------------------------------------------------------------------------- experiments


def exp_scaling(scale: Scale, seed: int) -> Outcome:
    """Error of trained models against d (main sweep), s and m, each beside the linear floor of x."""
    base = DataConfig(m=scale.m, s=scale.s, seed=seed)
    rows_d, rows_s, rows_m = [], [], []
    task = UANDTask(base)
    val = _eval_set(task, scale.n_eval, seed)
    floor = _floor(task)
    done = {}  # (m, s, d) -> metrics: the base point (m, s, d) is in all three sweeps, trained once
    for d in scale.d_grid:
        _, done[(scale.m, scale.s, d)] = _train_eval(task, ModelConfig(d=d), scale, seed, val)
        rows_d.append(_with_floor(_row(done[(scale.m, scale.s, d)], d=d), floor))
    for s in scale.s_grid:
        t = UANDTask(DataConfig(m=scale.m, s=s, seed=seed))
        if (scale.m, s, scale.d) not in done:
            _, done[(scale.m, s, scale.d)] = _train_eval(
                t, ModelConfig(d=scale.d), scale, seed, _eval_set(t, scale.n_eval, seed)
            )
        rows_s.append(_with_floor(_row(done[(scale.m, s, scale.d)], s=s), _floor(t)))
    for m in scale.m_grid:
        t = UANDTask(DataConfig(m=m, s=scale.s, seed=seed))
        if (m, scale.s, scale.d) not in done:
            _, done[(m, scale.s, scale.d)] = _train_eval(
                t, ModelConfig(d=scale.d), scale, seed, _eval_set(t, scale.n_eval, seed)
            )
        rows_m.append(_with_floor(_row(done[(m, scale.s, scale.d)], m=m, pairs=math.comb(m, 2)), _floor(t)))
    errs = [r["balanced_mse"] for r in rows_d]
    rho = _spearman(scale.d_grid, errs)
    s_errs = [r["balanced_mse"] for r in rows_s]
    s_ratio = max(s_errs) / max(min(s_errs), 1e-12)
    first = _first_below(scale.d_grid, errs, floor.balanced_mse)
    claims = [
        Claim(
            "trades_error_for_neurons",
            "error falls steadily as d grows, and with enough neurons the hidden layer beats the linear "
            "read-out of x (the floor: no hidden layer)",
            "Spearman rho(d, balanced MSE) <= -0.8 and balanced MSE at the largest d < the linear floor's",
            rho <= -0.8 and errs[-1] < floor.balanced_mse,
            {
                "spearman_rho": rho,
                "largest_d": scale.d_grid[-1],
                "mse_at_largest_d": errs[-1],
                "floor_mse": floor.balanced_mse,
                "largest_d_over_floor": errs[-1] / floor.balanced_mse,
                "smallest_d_below_floor": first,
                "balanced_mse_by_d": dict(zip(scale.d_grid, errs)),
            },
        ),
        Claim(
            "robust_to_s",
            "error roughly insensitive to s in the sparse regime",
            f"max/min balanced MSE over s in {scale.s_grid} <= 3",
            s_ratio <= 3,
            {
                "max_over_min": s_ratio,
                "balanced_mse_by_s": dict(zip(scale.s_grid, s_errs)),
                "floor_mse_by_s": {r["s"]: r["floor_mse"] for r in rows_s},
            },
        ),
    ]
    sections = [
        f"Linear floor (best read-out of x, no hidden layer) at m={scale.m}, s={scale.s}: balanced MSE "
        f"{floor.balanced_mse:.4g}, accuracy {floor.acc_pos:.4f} on positives and {floor.acc_neg:.4f} on "
        f"negatives (exact). `over_floor` is balanced_mse / floor_mse: below 1 the hidden layer beats it.\n",
        f"### Error vs d (m={scale.m}, s={scale.s})\n\n" + markdown_table(rows_d),
        f"### Error vs s (m={scale.m}, d={scale.d})\n\n" + markdown_table(rows_s),
        f"### Error vs m (s={scale.s}, d={scale.d})\n\n" + markdown_table(rows_m),
    ]
    return Outcome({"by_d": rows_d, "by_s": rows_s, "by_m": rows_m}, claims, {}, sections, plot=_plot_scaling(scale))


def _plot_scaling(scale: Scale) -> Callable[[dict, dict], dict]:
    def plot(mean: dict, sd: dict) -> dict:
        fig, axes = new_figure(ncols=3)
        for ax, key, x, logx, title in zip(
            axes[0],
            ("by_d", "by_s", "by_m"),
            ("d", "s", "m"),
            (True, False, True),
            (f"m={scale.m}, s={scale.s}", f"m={scale.m}, d={scale.d}", f"s={scale.s}, d={scale.d}"),
        ):
            _band_plot(ax, mean[key], sd[key], x, "balanced_mse", logx=logx, label="trained")
            ax.plot([r[x] for r in mean[key]], [r["floor_mse"] for r in mean[key]], "k--", label="linear floor of x")
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        return {"scaling": fig}

    return plot


def exp_constructions(scale: Scale, seed: int) -> Outcome:
    """Trained models against the Hänni and dense binary constructions at equal d, low s, and the floor."""
    task = UANDTask(DataConfig(m=scale.m, s=scale.s, seed=seed))
    val = _eval_set(task, scale.n_eval, seed)
    tune_set = _sample_set(task, scale.n_eval // 2, seed + 1)
    floor = _floor(task)
    rows = []
    for d in scale.d_grid:
        _, met = _train_eval(task, ModelConfig(d=d), scale, seed, val)
        rows.append(_row(met, method="trained", d=d))
        p, model, _, _ = tune(lambda p: hanni_construction(task, d, p, seed=seed), _hanni_grid(), task, tune_set)
        rows.append(_row(evaluate(model, task, *val), method="hanni", d=d, tuned=f"p={p}"))
        bias, model, _, _ = tune(
            lambda b: dense_binary_construction(task, d, b, seed=seed, calib=tune_set),
            _dense_bias_grid(),
            task,
            tune_set,
        )
        rows.append(_row(evaluate(model, task, *val), method="dense_sign", d=d, tuned=f"b={bias}"))
        model = dense_binary_construction(task, d, bias, seed=seed, readout="lstsq", n_fit=scale.n_fit)
        rows.append(_row(evaluate(model, task, *val), method="dense_lstsq", d=d, tuned=f"b={bias}"))
    rows = [_with_floor(r, floor) for r in rows]
    err = {(r["method"], r["d"]): r["balanced_mse"] for r in rows}
    grid = scale.d_grid
    best_dense = [min(err[("dense_sign", d)], err[("dense_lstsq", d)]) for d in grid]
    best_built = [min(err[("hanni", d)], b) for d, b in zip(grid, best_dense)]
    wins = [err[("trained", d)] < err[("hanni", d)] for d in grid]
    dense_wins = [b < err[("hanni", d)] for d, b in zip(grid, best_dense)]
    f = floor.balanced_mse
    first_trained = _first_below(grid, [err[("trained", d)] for d in grid], f)
    first_built = _first_below(grid, best_built, f)
    below = {
        name: [d for d in grid if err[(name, d)] < f] for name in ("trained", "hanni", "dense_sign", "dense_lstsq")
    }
    floor_numbers = {
        "floor_mse": f,
        "trained_first_d_below_floor": first_trained,
        "construction_first_d_below_floor": first_built,
        "d_below_floor": below,
    }
    claims = [
        Claim(
            "beats_sparse_construction",
            f"at low s (s={scale.s}) the trained model beats the Hänni construction at equal d",
            "trained balanced MSE < tuned Hänni balanced MSE at every d in the grid",
            all(wins),
            {
                "max_trained_over_hanni": max(err[("trained", d)] / err[("hanni", d)] for d in grid),
                **floor_numbers,
                "d": grid,
                "trained": [err[("trained", d)] for d in grid],
                "hanni": [err[("hanni", d)] for d in grid],
            },
        ),
        Claim(
            "beats_construction_beyond_floor",
            "the trained model beats the linear floor of x at a smaller d than any construction does "
            "(below the floor the hidden layer computes something x alone cannot)",
            "some d in the grid has trained balanced MSE < floor, and the smallest such d is below the smallest "
            "d at which the best construction (Hänni, dense sign or dense least squares) is below the floor "
            "(never counts as infinite)",
            first_trained is not None and (first_built is None or first_trained < first_built),
            {
                **floor_numbers,
                "best_trained_over_floor": min(err[("trained", d)] for d in grid) / f,
                "best_construction_over_floor": min(best_built) / f,
            },
        ),
        Claim(
            "dense_construction_beats_sparse",
            "the dense binary construction beats the Hänni construction at equal d",
            "best dense read-out balanced MSE < tuned Hänni balanced MSE at every d",
            all(dense_wins),
            {
                "max_dense_over_hanni": max(b / err[("hanni", d)] for d, b in zip(grid, best_dense)),
                "floor_mse": f,
                "dense_best": best_dense,
            },
        ),
    ]
    sections = [
        "Constructions are tuned on a separate sample (Hänni p, dense shared bias) and scored on the "
        "same evaluation inputs as the trained models. Linear floor of x (no hidden layer): balanced MSE "
        f"{f:.4g}, accuracy {floor.acc_pos:.4f} / {floor.acc_neg:.4f} on positives / negatives (exact); "
        "`over_floor` below 1 beats it.\n\n" + markdown_table(rows),
    ]
    return Outcome({"rows": rows}, claims, {}, sections, plot=_plot_constructions(scale))


def _plot_constructions(scale: Scale) -> Callable[[dict, dict], dict]:
    def plot(mean: dict, sd: dict) -> dict:
        fig, axes = new_figure()
        ax = axes[0][0]
        for method in ("trained", "hanni", "dense_sign", "dense_lstsq"):
            pick = [k for k, r in enumerate(mean["rows"]) if r["method"] == method]
            _band_plot(ax, [mean["rows"][k] for k in pick], [sd["rows"][k] for k in pick], "d", "balanced_mse", method)
        ax.axhline(mean["rows"][0]["floor_mse"], color="k", linestyle="--", label="linear floor of x")
        ax.set_title(f"m={scale.m}, s={scale.s}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return {"constructions": fig}

    return plot


def exp_anatomy(scale: Scale, seed: int) -> Outcome:
    """Dissect one trained model: density, binarity, sign-product read-out, neuron classes."""
    task = UANDTask(DataConfig(m=scale.m, s=scale.s, seed=seed))
    val = _eval_set(task, scale.n_eval, seed)
    model, met = _train_eval(task, ModelConfig(d=scale.d), scale, seed, val)
    init_W = UANDModel.for_task(task, ModelConfig(d=scale.d), seed=seed).W.detach()
    trained = analyse(model, task, val[1], seed=seed)
    trained["W_moved"] = float((model.W.detach() - init_W).norm() / init_W.norm())
    # The same at a small initial scale (rich regime: W must move far from its random draw).
    small, met_small = _train_eval(task, ModelConfig(d=scale.d, scale=0.1), scale, seed, val)
    small_an = analyse(small, task, val[1], seed=seed)
    tune_set = _sample_set(task, scale.n_eval // 2, seed + 1)
    p, hanni, _, _ = tune(lambda p: hanni_construction(task, scale.d, p, seed=seed), _hanni_grid(), task, tune_set)
    hanni_an = analyse(hanni, task, val[1], seed=seed)
    dens, bin_, sign = trained["density"], trained["binarity"], trained["readout_sign"]
    floor = _floor(task)
    claims = [
        Claim(
            "dense",
            "the learned circuit is dense: most neurons matter for every pair",
            "participation >= 0.5 and >= 3x the tuned Hänni construction's",
            dens["participation"] >= 0.5 and dens["participation"] >= 3 * hanni_an["density"]["participation"],
            {
                "participation": dens["participation"],
                "fraction_above_10pct": dens["fraction"],
                "hanni_participation": hanni_an["density"]["participation"],
                "hanni_p": p,
                "hanni_p_squared": p * p,
                "balanced_mse": met.balanced_mse,
                "floor_mse": floor.balanced_mse,
            },
        ),
        Claim(
            "binary_weights",
            "trained |W| is close to binary (one magnitude u)",
            "coefficient of variation of |W| per neuron <= 0.3 (uniform 0.58, Gaussian 0.76)",
            bin_["cv_per_neuron"] <= 0.3,
            {
                "cv": bin_["cv"],
                "cv_per_neuron": bin_["cv_per_neuron"],
                "near_u": bin_["near_u"],
                "frac_positive": bin_["frac_positive"],
                "W_moved_from_init": trained["W_moved"],
                "small_init_cv_per_neuron": small_an["binarity"]["cv_per_neuron"],
                "small_init_frac_positive": small_an["binarity"]["frac_positive"],
                "floor_mse": floor.balanced_mse,
            },
        ),
        Claim(
            "sign_product_readout",
            "read-out weights follow sign(W_ni) sign(W_nj)",
            "Pearson correlation of R with the sign product >= 0.5",
            sign["correlation"] >= 0.5,
            {**sign, "balanced_mse": met.balanced_mse, "floor_mse": floor.balanced_mse},
        ),
    ]
    ct = trained["class_table"]
    table_rows = [
        {"class": c, "fraction": f, **{f"cell {v}": a for v, a in zip(ct["cells"], acts)}}
        for c, f, acts in zip(ct["classes"], ct["class_fraction"], ct["mean_activation"])
    ]
    fig, axes = new_figure(ncols=2)
    W = model.W.detach().flatten()
    axes[0][0].hist(W.numpy(), bins=80)
    axes[0][0].set_title(f"trained W (d={scale.d}, m={scale.m})")
    im = axes[0][1].imshow(torch.tensor(ct["mean_activation"]).numpy(), cmap="viridis")
    axes[0][1].set_xticks(range(4), ct["cells"])
    axes[0][1].set_yticks(range(4), ct["classes"])
    axes[0][1].set_xlabel("cell (x_i x_j)")
    axes[0][1].set_title("mean activation per class")
    fig.colorbar(im, ax=axes[0][1])
    fig.tight_layout()
    sections = [
        f"Model: m={scale.m}, s={scale.s}, d={scale.d}; balanced MSE {met.balanced_mse:.4f}, "
        f"worst-cell accuracy {met.worst_cell_acc:.3f}; the linear floor of x (no hidden layer) has balanced "
        f"MSE {floor.balanced_mse:.4f} and worst-cell accuracy {floor.worst_cell_acc:.3f}.\n",
        "### Neuron classes (signs of W_ni, W_nj) and their mean activation per cell\n\n" + markdown_table(table_rows),
    ]
    compare = [
        {
            "model": name,
            "balanced_mse": m_.balanced_mse,
            "participation": a["density"]["participation"],
            "cv_per_neuron": a["binarity"]["cv_per_neuron"],
            "frac_positive": a["binarity"]["frac_positive"],
            "sign_corr": a["readout_sign"]["correlation"],
        }
        for name, m_, a in [
            ("trained (init scale 1)", met, trained),
            ("trained (init scale 0.1)", met_small, small_an),
            (f"Hänni (p={p})", evaluate(hanni, task, *val), hanni_an),
        ]
    ]
    compare = [_with_floor(row, floor) for row in compare]
    sections.insert(1, "### Trained models against the sparse construction\n\n" + markdown_table(compare))
    results = {
        "metrics": met.to_dict(),
        "trained": trained,
        "small_init": small_an,
        "hanni": hanni_an,
        "hanni_p": p,
        "compare": compare,
    }
    return Outcome(results, claims, {"anatomy": fig}, sections)


FROZEN_DISTS = [("gaussian", 0.5), ("uniform", 0.5), ("binary", 0.5), ("skewed_binary", 0.25), ("skewed_binary", 0.75)]


def exp_frozen(scale: Scale, seed: int) -> Outcome:
    """W frozen at a random draw from each distribution (equal RMS); only b, R, c are trained."""
    task = UANDTask(DataConfig(m=scale.m, s=scale.s, seed=seed))
    val = _eval_set(task, scale.n_eval, seed)
    floor = _floor(task)
    rows = []
    for dist, skew in FROZEN_DISTS:
        _, met = _train_eval(task, ModelConfig(d=scale.d, init=dist, skew=skew, frozen=("W",)), scale, seed, val)
        name = dist if dist != "skewed_binary" else f"skewed_binary(p={skew})"
        rows.append(_with_floor(_row(met, dist=name), floor))
    err = {r["dist"]: r["balanced_mse"] for r in rows}
    skewed = min(err["skewed_binary(p=0.25)"], err["skewed_binary(p=0.75)"])
    ratio = max(err.values()) / max(min(err.values()), 1e-12)
    claims = [
        Claim(
            "frozen_similar",
            "frozen W distributions give similar losses",
            "max/min balanced MSE <= 1.5",
            ratio <= 1.5,
            {"max_over_min": ratio, **err, "floor_mse": floor.balanced_mse},
        ),
        Claim(
            "binary_best",
            "binary is (slightly) best among the symmetric distributions",
            "binary balanced MSE < Gaussian and < uniform",
            err["binary"] < min(err["gaussian"], err["uniform"]),
            {**{k: err[k] for k in ("binary", "gaussian", "uniform")}, "floor_mse": floor.balanced_mse},
        ),
        Claim(
            "skew_helps_and",
            "skewed binary beats symmetric binary on AND",
            "best of skew p=0.25 / 0.75 balanced MSE < binary (both skews reported)",
            skewed < err["binary"],
            {"binary": err["binary"], "best_skewed": skewed, "floor_mse": floor.balanced_mse},
        ),
    ]
    sections = [
        "All distributions have the same weight RMS (1); `floor_mse` is the linear floor of x (no hidden "
        "layer).\n\n" + markdown_table(rows),
    ]
    return Outcome({"rows": rows}, claims, {}, sections, plot=_plot_frozen(scale))


def _plot_frozen(scale: Scale) -> Callable[[dict, dict], dict]:
    def plot(mean: dict, sd: dict) -> dict:
        rows, spread = mean["rows"], sd["rows"]
        fig, axes = new_figure(size=(7, 4))
        ax = axes[0][0]
        ax.bar(range(len(rows)), [r["balanced_mse"] for r in rows], yerr=[r["balanced_mse"] or 0.0 for r in spread])
        ax.axhline(rows[0]["floor_mse"], color="k", linestyle="--", label="linear floor of x")
        ax.set_xticks(range(len(rows)), [r["dist"] for r in rows], rotation=20, fontsize=8)
        ax.set_ylabel("balanced MSE (mean ± sd over seeds)")
        ax.set_title(f"frozen W, trained b/R/c (m={scale.m}, s={scale.s}, d={scale.d})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return {"frozen": fig}

    return plot


TABLES = ["and", "or", "xor", "nand", "nor", "xnor"]


def exp_truth_tables(scale: Scale, seed: int) -> Outcome:
    """Every two-input table read linearly from the hidden layer of a model trained only on AND.

    Baselines: the same model before training (random Gaussian W, zero bias) and the raw inputs
    x (a linear function of x cannot compute XOR), both fitted like the hidden layers and, for x,
    also exactly (`raw_inputs_exact`: the linear floor for the cell-balanced loss). Read-outs are
    cell-balanced least squares from one statistics pass per hidden layer (readout.solve_readout);
    XOR is also read out by training R, c with Adam on the frozen layer.
    """
    task = UANDTask(DataConfig(m=scale.m, s=scale.s, seed=seed))
    val = _eval_set(task, scale.n_eval, seed)
    model_cfg = ModelConfig(d=scale.d_wide)
    untrained = UANDModel.for_task(task, model_cfg, seed=seed)
    trained, _ = _train_eval(task, model_cfg, scale, seed, val)
    hiddens = {"and_trained": trained.hidden, "random_init": untrained.hidden, "raw_inputs": lambda inputs: inputs}
    rows = []
    for name, hidden in hiddens.items():
        stats = collect_stats(hidden, task, scale.n_fit, torch.Generator().manual_seed(seed + 7))
        with torch.no_grad():
            h_val = hidden(val[1])
        for op in TABLES:
            t = task.with_op(op)
            R, c = solve_readout(stats, t)
            met = evaluate(lambda h: h @ R.T + c, t, val[0], h_val)
            rows.append(_row(met, hidden=name, table=op.upper()))
    for op in TABLES:  # the exact linear floor of x for the cell-balanced loss (raw_inputs above is fitted)
        rows.append(_row(_floor(task.with_op(op), "cells"), hidden="raw_inputs_exact", table=op.upper()))
    # The same question with a read-out trained by Adam (W, b frozen) on the cell-balanced loss:
    # no covariance approximation. (The class-balanced loss would ignore XOR's rare cell 11,
    # which sits inside the common negative class.)
    xor = task.with_op("xor")
    identity = (torch.eye(task.m), torch.zeros(task.m))
    sources = {"and_trained": (trained.W, trained.b), "random_init": (untrained.W, untrained.b), "raw_inputs": identity}
    adam_rows = []
    for name, (W, b) in sources.items():
        head = UANDModel.for_task(xor, ModelConfig(d=W.shape[0], frozen=("W", "b")), seed=seed)
        with torch.no_grad():
            head.W.copy_(W)
            head.b.copy_(b)
        train(
            head,
            xor,
            TrainConfig(steps=scale.steps, batch_size=scale.batch_size, lr=scale.lr, loss="cells", seed=seed + 3),
        )
        adam_rows.append(_row(evaluate(head, xor, *val), hidden=name, table="XOR"))
    get = {(r["hidden"], r["table"]): r for r in rows}
    adam = {r["hidden"]: r for r in adam_rows}
    xor_t, xor_raw = get[("and_trained", "XOR")], get[("raw_inputs", "XOR")]
    xor_floor = get[("raw_inputs_exact", "XOR")]
    floor_numbers = {
        "floor_worst_cell_acc": xor_floor["worst_cell_acc"],
        "floor_cell_mse": xor_floor["cell_mse_mean"],
    }
    crit = "XOR worst-cell accuracy >= 0.9 and cell-mean MSE < half the raw-input read-out's"
    claims = [
        Claim(
            "xor_readable_from_and",
            "XOR is linearly readable from the hidden layer of an AND-trained model",
            crit + " (least-squares read-out)",
            xor_t["worst_cell_acc"] >= 0.9 and xor_t["cell_mse_mean"] < 0.5 * xor_raw["cell_mse_mean"],
            {
                "trained_worst_cell_acc": xor_t["worst_cell_acc"],
                "trained_cell_mse": xor_t["cell_mse_mean"],
                "raw_worst_cell_acc": xor_raw["worst_cell_acc"],
                "raw_cell_mse": xor_raw["cell_mse_mean"],
                **floor_numbers,
                "random_init_worst_cell_acc": get[("random_init", "XOR")]["worst_cell_acc"],
            },
        ),
        Claim(
            "xor_readable_from_and_adam",
            "same, with a read-out trained by Adam on the cell-balanced loss",
            crit + " (Adam read-out)",
            adam["and_trained"]["worst_cell_acc"] >= 0.9
            and adam["and_trained"]["cell_mse_mean"] < 0.5 * adam["raw_inputs"]["cell_mse_mean"],
            {**{f"{k}_{m}": adam[k][m] for k in adam for m in ("worst_cell_acc", "cell_mse_mean")}, **floor_numbers},
        ),
        Claim(
            "xor_specific_to_training",
            "the AND-trained layer reads XOR better than the same layer before training",
            "Adam read-out: AND-trained XOR cell-mean MSE < 0.8 x random-init's",
            adam["and_trained"]["cell_mse_mean"] < 0.8 * adam["random_init"]["cell_mse_mean"],
            {
                "and_trained": adam["and_trained"]["cell_mse_mean"],
                "random_init": adam["random_init"]["cell_mse_mean"],
                **floor_numbers,
            },
        ),
    ]
    fig, axes = new_figure(size=(7, 4))
    ax = axes[0][0]
    width = 0.2
    for k, name in enumerate([*hiddens, "raw_inputs_exact"]):
        ax.bar(
            [x + (k - 1.5) * width for x in range(len(TABLES))],
            [get[(name, op.upper())]["worst_cell_acc"] for op in TABLES],
            width,
            label=name,
        )
    ax.set_xticks(range(len(TABLES)), [op.upper() for op in TABLES])
    ax.set_ylabel("worst-cell accuracy")
    ax.set_title(f"linear read-outs (m={scale.m}, s={scale.s}, d={scale.d_wide})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    sections = [
        "Worst-cell accuracy is the thresholded accuracy of the worst input cell (00/01/10/11): "
        "a read-out that gets XOR's rare (1,1) cell wrong scores low even if overall accuracy is high.\n\n"
        + markdown_table(rows),
        "### XOR with a read-out trained by Adam (W, b frozen, cell-balanced loss)\n\n" + markdown_table(adam_rows),
    ]
    return Outcome({"rows": rows, "adam_xor": adam_rows}, claims, {"truth_tables": fig}, sections)


def exp_noise(scale: Scale, seed: int) -> Outcome:
    """Noise-sensitivity control: is the computation real, or does it lean on input noise?

    Following Bhagat et al.'s check on the APD compressed-computation toy, train at several
    input-noise levels and evaluate every model on clean and noisy inputs.
    """
    levels = [0.0, 0.1] if scale.m <= 30 else [0.0, 0.05, 0.1, 0.2]
    floor = _floor(UANDTask(DataConfig(m=scale.m, s=scale.s, seed=seed)))  # reads clean x: no noise at all
    rows = []
    for train_noise in levels:
        task = UANDTask(DataConfig(m=scale.m, s=scale.s, noise=train_noise, seed=seed))
        model = UANDModel.for_task(task, ModelConfig(d=scale.d), seed=seed)
        train(model, task, TrainConfig(steps=scale.steps, batch_size=scale.batch_size, lr=scale.lr, seed=seed))
        for eval_noise in levels:
            t = UANDTask(DataConfig(m=scale.m, s=scale.s, noise=eval_noise, seed=seed))
            met = evaluate(model, t, *_eval_set(t, scale.n_eval, seed))
            rows.append(_with_floor(_row(met, train_noise=train_noise, eval_noise=eval_noise), floor))
    err = {(r["train_noise"], r["eval_noise"]): r["balanced_mse"] for r in rows}
    clean = err[(0.0, 0.0)]
    best_noisy_on_clean = min(err[(n, 0.0)] for n in levels[1:])
    claims = [
        Claim(
            "not_noise_driven",
            "the circuit does not rely on noise: training without noise is best on clean inputs",
            "clean-trained error on clean inputs <= 1.1 x every noise-trained model's clean error",
            clean <= 1.1 * best_noisy_on_clean,
            {
                "clean_trained_clean": clean,
                "best_noise_trained_clean": best_noisy_on_clean,
                "floor_mse": floor.balanced_mse,
            },
        ),
    ]
    sections = ["`floor_mse`: the linear floor of clean x (no hidden layer, no noise).\n\n" + markdown_table(rows)]
    plot = _plot_groups("noise", "eval_noise", "train_noise", "legend: training noise", logx=False)
    return Outcome({"rows": rows}, claims, {}, sections, plot=plot)


def exp_superposition(scale: Scale, seed: int) -> Outcome:
    """Inputs stored in superposition (random unit directions in d0 < m dimensions)."""
    d0s = [None] + [max(2, int(scale.m * f)) for f in (0.75, 0.5, 0.25)]
    floor = _floor(UANDTask(DataConfig(m=scale.m, s=scale.s, seed=seed)))
    rows = []
    for d0 in d0s:
        task = UANDTask(DataConfig(m=scale.m, s=scale.s, d0=d0, seed=seed))
        val = _eval_set(task, scale.n_eval, seed)
        _, met = _train_eval(task, ModelConfig(d=scale.d), scale, seed, val)
        rows.append(_with_floor(_row(met, method="trained", d0=d0 or scale.m), floor))
        model = dense_binary_construction(task, scale.d, -1.0, seed=seed, readout="lstsq", n_fit=scale.n_fit)
        rows.append(_with_floor(_row(evaluate(model, task, *val), method="dense_lstsq", d0=d0 or scale.m), floor))
    err = {(r["method"], r["d0"]): r for r in rows}
    half = d0s[2]
    basis, sup = err[("trained", scale.m)], err[("trained", half)]
    claims = [
        Claim(
            "survives_superposition",
            "computation survives inputs in superposition",
            f"at d0 = m/2 ({half}) the trained model's balanced accuracy >= 0.9",
            sup["acc_pos"] * 0.5 + sup["acc_neg"] * 0.5 >= 0.9,
            {
                "basis_balanced_mse": basis["balanced_mse"],
                "half_balanced_mse": sup["balanced_mse"],
                "half_acc_pos": sup["acc_pos"],
                "half_acc_neg": sup["acc_neg"],
                "floor_mse": floor.balanced_mse,
                "floor_acc_pos": floor.acc_pos,
                "floor_acc_neg": floor.acc_neg,
            },
        ),
    ]
    sections = [
        "`floor_mse`: the linear floor of the basis-aligned x (no hidden layer, no superposition), a stricter "
        "baseline than any linear read-out of the embedded input.\n\n" + markdown_table(rows)
    ]
    plot = _plot_groups("superposition", "d0", "method", f"m={scale.m}, s={scale.s}, d={scale.d}", logx=False)
    return Outcome({"rows": rows}, claims, {}, sections, plot=plot)


def exp_circuit(scale: Scale, seed: int) -> Outcome:
    """A two-step boolean circuit OR(AND(x_i, x_j), x_k): one hidden layer vs two of equal total width."""
    task = UANDTask(DataConfig(m=scale.m, s=scale.s, op="and", circuit_op="or", seed=seed))
    val = _eval_set(task, scale.n_eval, seed)
    floor = _floor(task)
    rows = []
    for name, cfg in [("one_layer", ModelConfig(d=2 * scale.d)), ("two_layer", ModelConfig(d=scale.d, d2=scale.d))]:
        _, met = _train_eval(task, cfg, scale, seed, val)
        rows.append(_with_floor(_row(met, model=name), floor))
    claims = [
        Claim(
            "circuit_learnable",
            "a two-step circuit OR(AND(x_i,x_j), x_k) is learned in superposition",
            "best balanced accuracy over the two architectures >= 0.9",
            max(0.5 * (r["acc_pos"] + r["acc_neg"]) for r in rows) >= 0.9,
            {
                **{r["model"]: r["balanced_mse"] for r in rows},
                "floor_mse": floor.balanced_mse,
                "floor_balanced_acc": floor.balanced_acc,
            },
        ),
    ]
    sections = [
        "`floor_mse`: the best linear read-out of x for OR(AND(x_i, x_j), x_k) (no hidden layer; with exactly "
        "s inputs on, x_i + x_j + 2 x_k >= 2 is a linear threshold for it).\n\n" + markdown_table(rows)
    ]
    return Outcome({"rows": rows}, claims, {}, sections)


def exp_scale_m(scale: Scale, seed: int) -> Outcome:
    """m = 1000 (499,500 pair outputs): a trained model and the dense construction, scored on every output.

    A dense step at m = 1000 computes [batch, 499500] outputs (about 12 GiB at batch 256), so the
    trained model uses the sampled-output loss (model.sampled_output_loss: every output with an
    active input plus `output_sample` random others per step). Evaluation streams all outputs in
    chunks (metrics.evaluate). Each pair has its own read-out row, and at batch 64 a pair is
    positive in about 3 / C(m, 2) of the samples: a few hundred steps show each pair's positive
    cell less than once, so the trained read-out is sample-limited at this size (reported as
    `positives_per_pair`). The dense binary construction needs no per-pair data (a sign-product
    read-out, two calibrated numbers), so it shows what one shared hidden layer of d neurons does
    for half a million ANDs. Peak RSS is the process maximum (ru_maxrss) after the experiment.
    """
    task = UANDTask(DataConfig(m=scale.m_big, s=scale.s, seed=seed))
    val = _eval_set(task, scale.n_eval_big, seed)
    small = _sample_set(task, max(scale.n_eval_big // 4, 50), seed + 1)  # tuning and calibration
    rows = []
    start = time.perf_counter()
    model = UANDModel.for_task(task, ModelConfig(d=scale.d_big), seed=seed)
    train(
        model,
        task,
        TrainConfig(
            steps=scale.steps_big, batch_size=scale.batch_big, lr=scale.lr, seed=seed, output_sample=scale.output_sample
        ),
    )
    train_s = time.perf_counter() - start
    met = evaluate(model, task, *val)
    seen = scale.steps_big * scale.batch_big * math.comb(scale.s, 2) / task.n_pairs
    rows.append(_row(met, method="trained (sampled loss)", d=scale.d_big, seconds=time.perf_counter() - start))
    # The trained hidden layer with the sign-product read-out instead of the per-pair learned one.
    t0 = time.perf_counter()
    signed = frozen_model(
        task,
        model.W.detach(),
        model.b.detach(),
        sign_product_readout(model.W.detach(), task),
        torch.zeros(task.n_pairs),
    )
    calibrate(signed, task, *small)
    signed_met = evaluate(signed, task, *val)
    rows.append(
        _row(signed_met, method="trained W, b + sign read-out", d=scale.d_big, seconds=time.perf_counter() - t0)
    )
    del model, signed
    for d in scale.d_big_grid:
        t0 = time.perf_counter()
        bias, built, _, _ = tune(
            lambda b: dense_binary_construction(task, d, b, seed=seed, calib=small), [-3.5, -2.5, -1.5], task, small
        )
        rows.append(
            _row(
                evaluate(built, task, *val),
                method="dense_sign",
                d=d,
                tuned=f"b={bias}",
                seconds=time.perf_counter() - t0,
            )
        )
        del built
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    floor = _floor(task)
    rows = [_with_floor(r, floor) for r in rows]
    dense = {r["d"]: r for r in rows if r["method"] == "dense_sign"}
    best = dense[max(dense)]
    bal_acc = lambda r: 0.5 * (r["acc_pos"] + r["acc_neg"])  # noqa: E731
    claims = [
        Claim(
            "fits_memory_large_m",
            f"m = {scale.m_big} ({task.n_pairs} outputs) trains and evaluates within 24 GiB",
            "process peak RSS <= 24 GiB",
            peak_gib <= 24,
            {"peak_rss_gib": peak_gib, "pairs": task.n_pairs, "train_s": train_s},
        ),
        Claim(
            "dense_circuit_large_m",
            f"one shared dense layer computes all {task.n_pairs} ANDs",
            f"dense sign-product construction at d={max(dense)}: balanced accuracy >= 0.9 on every output",
            bal_acc(best) >= 0.9,
            {
                "balanced_acc": bal_acc(best),
                "balanced_mse": best["balanced_mse"],
                "d": max(dense),
                "floor_mse": floor.balanced_mse,
                "floor_balanced_acc": floor.balanced_acc,
            },
        ),
        Claim(
            "trained_large_m_beats_zero",
            f"the sampled-loss trained model learns at m = {scale.m_big}",
            "balanced MSE < 0.25 (zero predictor 0.5)",
            met.balanced_mse < 0.25,
            {
                "balanced_mse": met.balanced_mse,
                "acc_pos": met.acc_pos,
                "acc_neg": met.acc_neg,
                "positives_per_pair": seen,
                "trained_sign_readout_balanced_mse": signed_met.balanced_mse,
                "floor_mse": floor.balanced_mse,
            },
        ),
    ]
    sections = [
        f"m={scale.m_big}, s={scale.s}, {task.n_pairs} outputs, scored on all of them for {scale.n_eval_big} "
        f"samples. Trained: d={scale.d_big}, {scale.steps_big} steps of batch {scale.batch_big}, sampled-output "
        f"loss ({scale.output_sample} random cell-00 columns per step), {train_s:.0f} s; each pair was positive "
        f"{seen:.2f} times on average in training. Process peak RSS {peak_gib:.2f} GiB. The linear floor of x "
        f"(no hidden layer, exact over all inputs) has balanced MSE {floor.balanced_mse:.4g} and accuracy "
        f"{floor.acc_pos:.4f} / {floor.acc_neg:.4f} on positives / negatives.\n\n" + markdown_table(rows),
    ]
    return Outcome(
        {"rows": rows, "peak_rss_gib": peak_gib, "train_s": train_s, "positives_per_pair": seen}, claims, {}, sections
    )


@dataclass
class Experiment:
    run: Callable[[Scale, int], Outcome]
    help: str


EXPERIMENTS: dict[str, Experiment] = {
    "scaling": Experiment(exp_scaling, "error vs d, s and m for trained models"),
    "constructions": Experiment(exp_constructions, "trained vs Hänni sparse and dense binary constructions"),
    "anatomy": Experiment(exp_anatomy, "density, binarity, neuron classes and sign read-out of a trained model"),
    "frozen": Experiment(exp_frozen, "frozen W (Gaussian/uniform/binary/skewed), training only b, R, c"),
    "truth_tables": Experiment(exp_truth_tables, "XOR and other tables read linearly from an AND-trained layer"),
    "noise": Experiment(exp_noise, "noise-sensitivity control"),
    "superposition": Experiment(exp_superposition, "inputs in superposition (d0 < m)"),
    "circuit": Experiment(exp_circuit, "two-step boolean circuit, one vs two hidden layers"),
    "scale_m": Experiment(exp_scale_m, "m = 1000 (499,500 outputs): sampled-loss training, dense construction, memory"),
}


# ----------------------------------------------------------------------------- writing


def _claim_rows(claims: list[Claim], experiment: str | None = None) -> list[dict]:
    rows = []
    for c in claims:
        nums = ", ".join(
            f"{k}={_short(v, c.numbers.get(k + '_sd'))}"
            for k, v in c.numbers.items()
            if not k.endswith("_sd") and not isinstance(v, (list, dict))
        )
        row = {"claim": c.name, "holds": "yes" if c.holds else "NO", "criterion": c.criterion, "numbers": nums}
        rows.append({"experiment": experiment, **row} if experiment else row)
    return rows


def _short(v, sd=None) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return f"{text} ± {sd:.2g}" if isinstance(sd, float) and sd > 0 else text


def _title(name: str) -> str:
    return f"U-AND: {name} — {EXPERIMENTS[name].help}" if name in EXPERIMENTS else f"U-AND: {name}"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_sd(values: list):
    """(mean, sd) over seeds of matching structures: dicts by key, lists by position, numbers averaged.

    Numbers that agree in every seed (d, m, a tuned value) stay as they are with sd 0; strings that
    differ are joined with '/'; lists whose lengths differ are kept per seed.
    """
    first = values[0]
    if isinstance(first, dict):
        pairs = {k: mean_sd([v.get(k) if isinstance(v, dict) else None for v in values]) for k in first}
        return {k: m for k, (m, _) in pairs.items()}, {k: sd for k, (_, sd) in pairs.items()}
    if isinstance(first, (list, tuple)):
        if all(isinstance(v, (list, tuple)) and len(v) == len(first) for v in values):
            pairs = [mean_sd([v[k] for v in values]) for k in range(len(first))]
            return [m for m, _ in pairs], [sd for _, sd in pairs]
        return list(values), None
    if all(v == first for v in values):
        return first, (0.0 if _number(first) else None)
    nums = [float(v) for v in values if _number(v) and math.isfinite(v)]
    if nums and len(nums) == len(values):
        mean = sum(nums) / len(nums)
        sd = math.sqrt(sum((v - mean) ** 2 for v in nums) / max(len(nums) - 1, 1))
        return mean, sd
    return "/".join(dict.fromkeys(str(v) for v in values)), None


def combine_claims(per_seed: list[list[Claim]], seeds: list[int]) -> list[Claim]:
    """One claim per name: holds only if it holds in every seed; numbers are mean and sd over seeds."""
    out = []
    for k, first in enumerate(per_seed[0]):
        versions = [claims[k] for claims in per_seed]
        mean, sd = mean_sd([c.numbers for c in versions])
        numbers = {"holds_in_seeds": f"{sum(c.holds for c in versions)}/{len(versions)}"}
        for key, value in mean.items():
            numbers[key] = value
            if isinstance(sd.get(key), float) and sd[key] > 0:
                numbers[key + "_sd"] = sd[key]
        numbers["per_seed"] = {seed: c.numbers for seed, c in zip(seeds, versions)}
        criterion = first.criterion + (f"; in every one of {len(seeds)} seeds" if len(seeds) > 1 else "")
        out.append(Claim(first.name, first.statement, criterion, all(c.holds for c in versions), numbers))
    return out


def _spread_tables(mean: dict, sd: dict) -> list[str]:
    """Every list of rows in the results as a Markdown table with 'mean ± sd' cells."""
    sections = []
    for key, rows in mean.items():
        if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
            continue
        cells = []
        for row, spread in zip(rows, sd[key] or [{}] * len(rows)):
            cells.append(
                {
                    c: _short(v, (spread or {}).get(c)) if _number(v) else v
                    for c, v in row.items()
                    if not isinstance(v, (list, dict))
                }
            )
        sections.append(f"### {key}\n\n" + markdown_table(cells))
    return sections


def run_experiment(name: str, out: Path, quick: bool = False, seed: int = 0, seeds: int | None = None) -> dict:
    """Run one experiment (or `all`) for `seeds` seeds (default `Scale.seeds`) and write its report under `out`."""
    out = Path(out)
    if name == "all":
        return _run_all(out, quick, seed, seeds)
    scale = Scale.make(quick)
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"seeds={seeds}: run at least 1 seed")
        scale.seeds = seeds
    run_seeds = list(range(seed, seed + scale.seeds))
    start, cpu_start = time.perf_counter(), time.process_time()
    outcomes = [EXPERIMENTS[name].run(scale, s) for s in run_seeds]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    mean, sd = mean_sd([o.results for o in outcomes])
    claims = combine_claims([o.claims for o in outcomes], run_seeds)
    first = outcomes[0]
    figures = first.plot(mean, sd) if first.plot is not None else first.figures
    for o in outcomes[1:]:
        for fig in o.figures.values():
            plt.close(fig)
    if first.plot is not None:
        for fig in first.figures.values():
            plt.close(fig)
    for stem, fig in figures.items():
        save_figure(fig, out / f"{stem}.png", dpi=110)
        plt.close(fig)
    record = {
        "experiment": name,
        "quick": quick,
        "seed": seed,
        "seeds": run_seeds,
        "scale": asdict(scale),
        "wall_s": wall,
        "cpu_s": cpu,  # one thread: about the wall time on a quiet core, whatever else the machine runs
        "load_avg": list(os.getloadavg()),
        "claims": [asdict(c) for c in claims],
        "results": mean,  # mean over seeds (values equal in every seed stay as they are)
        "results_sd": sd,
        "results_per_seed": {s: o.results for s, o in zip(run_seeds, outcomes)},
    }
    write_json(out / "results.json", _clean(record))
    load = os.getloadavg()[0]
    plots = "" if first.plot is not None else f" Plots show seed {seed}."
    report = [
        f"# {_title(name)}\n",
        f"quick={quick}, seeds {run_seeds}, wall time {wall:.1f} s, CPU time {cpu:.1f} s (load average "
        f"{load:.1f}). A claim holds only if it holds in every seed; its numbers are the mean (± standard "
        f"deviation) over seeds.{plots}\n",
    ]
    if claims:
        report.append("## Claims\n\n" + markdown_table(_claim_rows(claims)))
    if len(run_seeds) > 1:
        report.append(f"## Results: mean ± sd over seeds {run_seeds}\n")
        report += _spread_tables(mean, sd)
    report.append(f"## Results of seed {seed} in detail\n")
    report += first.sections
    report += [f"![{stem}]({stem}.png)\n" for stem in figures]
    write_text(out / "report.md", "\n".join(report))
    return record


def _run_all(out: Path, quick: bool, seed: int, seeds: int | None) -> dict:
    start = time.perf_counter()
    records = {name: run_experiment(name, out / name, quick, seed, seeds) for name in EXPERIMENTS}
    return write_combined(out, records, time.perf_counter() - start, quick, seed)


def write_combined(out: Path, records: dict, wall: float, quick: bool, seed: int) -> dict:
    """The `all` summary (results.json, report.md with every claim and wall time) from per-experiment records."""
    claims = [c for rec in records.values() for c in rec["claims"]]
    summary = {
        "experiment": "all",
        "quick": quick,
        "seed": seed,
        "wall_s": wall,
        "wall_s_by_experiment": {k: r["wall_s"] for k, r in records.items()},
        "cpu_s_by_experiment": {k: r.get("cpu_s") for k, r in records.items()},
        "claims": [{"experiment": name, **c} for name, rec in records.items() for c in rec["claims"]],
    }
    write_json(out / "results.json", _clean(summary))
    rows = []
    for name, rec in records.items():
        rows += _claim_rows([Claim(**c) for c in rec["claims"]], experiment=name)
    times = [
        {
            "experiment": k,
            "wall_s": r["wall_s"],
            "cpu_s": r.get("cpu_s"),
            "load_1min_at_end": (r.get("load_avg") or [None])[0],
        }
        for k, r in records.items()
    ]
    report = [
        "# U-AND lab: all experiments\n",
        f"quick={quick}, seeds {next(iter(records.values()), {}).get('seeds', [seed])}, total wall time "
        f"{wall:.1f} s; {sum(c['holds'] for c in claims)} of "
        f"{len(claims)} claims hold. Each experiment's report is in its own folder.\n",
        "## Claims\n\n" + markdown_table(rows),
        "## Wall time\n\n" + markdown_table(times),
    ]
    write_text(out / "report.md", "\n".join(report))
    return summary


def _clean(obj):
    """JSON-safe: NaN/inf become None, tuples lists, dict keys strings."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    return obj
