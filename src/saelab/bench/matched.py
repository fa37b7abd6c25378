"""Comparing architectures at one L0: the plan, the interpolation, convergence and seed spread.

A default sparsity setting ranks how well that default suits a world, not the architecture. Here
every architecture is brought to one target L0 (the world's true L0, rounded, unless one is given):
- **k**: the count families (TopK, BatchTopK, ...) set the number of active latents to the target;
- **target_l0**: the penalty families that can adapt their coefficient (ReLU, Gated, JumpReLU)
  train to the target (`saelab.sae.target_l0`);
- **interpolated**: the rest (and the count families at a non-integer target) are swept along their
  sparsity setting, and each metric is read off the frontier at the target, linearly in log L0
  between the two runs whose L0s bracket it. A target outside the sweep is "not bracketed": no
  extrapolation;
- **none**: dense baselines (PCA, ICA, NMF) have no sparsity setting and cannot be matched.

A run counts as matched when its L0 is within `L0_TOLERANCE` of the target (the single-run
methods) or when it is bracketed (interpolated). Convergence is judged from the training log: the
FVU of fresh batches (a toy stream never repeats, so each is held out until its own update),
averaged over the last `CONVERGENCE_WINDOW` of the steps before the learning-rate decay, against its
average over the window before; below `CONVERGENCE_TOLERANCE` relative change counts as converged.
Every seed gives one matched record per architecture; the leaderboard shows their mean and spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from saelab.errors import ConfigError

L0_TOLERANCE = 0.1  # relative: an L0 within 10% of the target counts as matched
CONVERGENCE_WINDOW = 0.2  # fraction of the steps in each of the two windows compared
CONVERGENCE_TOLERANCE = 0.05  # relative FVU change between them that counts as converged
SWEEP_MULTIPLIERS = (0.25, 0.5, 1.0)  # default sweep for the interpolated families (x the default coefficient^-1)

# Metrics aggregated over seeds (and interpolated along a sweep): the evaluation record's numbers.
METRICS = (
    "l0",
    "fvu",
    "recovered_fraction",
    "mmcs_decoder",
    "mmcs_encoder",
    "shrinkage",
    "dead_fraction",
    "dense_fraction",
)


def target_from(true_l0: float, l0: float | None = None) -> float:
    """The L0 every architecture is compared at: `l0` when given, else the true L0 rounded (at least 1)."""
    if l0 is not None:
        if not (isinstance(l0, (int, float)) and not isinstance(l0, bool) and l0 > 0 and math.isfinite(l0)):
            raise ConfigError(f"the matched L0 must be a positive number (got {l0!r})")
        return float(l0)
    return float(max(1, round(true_l0)))


def matched_settings(
    architecture: str, target: float, sweep: Sequence[float] = SWEEP_MULTIPLIERS
) -> tuple[str, list[dict[str, Any]]]:
    """(method, the SAE settings to train) that put `architecture` at L0 = `target`; method is one
    of "k", "target_l0", "interpolated" or "none" (see the module docstring). `sweep` holds the
    multipliers of the default coefficient's inverse (>1: more active latents) for "interpolated"."""
    from saelab.sae.registry import get_class, sweep_setting
    from saelab.sae.target_l0 import TargetL0

    cls = get_class(architecture)
    knob = cls.sweep_parameter
    if knob is None:
        return "none", [{}]
    if cls.sweep_kind == "count":
        if float(target).is_integer():
            return "k", [{knob: int(target)}]
        return "interpolated", [{knob: math.floor(target)}, {knob: math.ceil(target)}] if target > 1 else [{knob: 1}]
    if issubclass(cls, TargetL0) and cls.trains_to_target_l0():
        return "target_l0", [{"target_l0": float(target)}]
    if not sweep or any(m <= 0 for m in sweep):
        raise ConfigError(f"the sweep multipliers must be positive numbers (got {list(sweep)})")
    return "interpolated", [sweep_setting(architecture, m, target) for m in sorted(set(sweep))]


def interpolate_at(points: Iterable[tuple[float, float]], target: float) -> float | None:
    """The value at L0 = `target` on the frontier through `points` ((L0, value) pairs), linear in
    log L0 between the two nearest points on either side; None when no pair brackets the target
    (never extrapolated). A point exactly at the target gives its value."""
    pts = sorted((float(l0), float(v)) for l0, v in points if l0 > 0 and math.isfinite(l0) and math.isfinite(v))
    for l0, v in pts:
        if l0 == target:
            return v
    for (l_a, v_a), (l_b, v_b) in zip(pts, pts[1:]):
        if l_a < target < l_b:
            w = (math.log(target) - math.log(l_a)) / (math.log(l_b) - math.log(l_a))
            return v_a + w * (v_b - v_a)
    return None


def convergence(history: Sequence[dict[str, Any]], steps: int, decay_fraction: float) -> dict[str, Any]:
    """`{"converged": bool | None, "fvu_change": float | None}` from a run's metrics log: the
    relative change of the mean logged FVU between the last two windows before the lr decay.
    None when the log has too few records there to tell (a fitted baseline has none)."""
    end = steps - int(steps * decay_fraction)
    width = CONVERGENCE_WINDOW * steps
    windows = [(end - 2 * width, end - width), (end - width, end)]
    means = []
    for lo, hi in windows:
        vals = [r["fvu"] for r in history if lo < r.get("step", -1) <= hi and isinstance(r.get("fvu"), (int, float))]
        if len(vals) < 2:
            return {"converged": None, "fvu_change": None}
        means.append(sum(vals) / len(vals))
    change = (means[1] - means[0]) / max(abs(means[0]), 1e-12)
    return {"converged": abs(change) < CONVERGENCE_TOLERANCE, "fvu_change": change}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def matched_record(
    records: Sequence[dict[str, Any]], method: str, target: float, metrics: Sequence[str] = METRICS
) -> dict[str, Any]:
    """One seed's record of one architecture at the target L0, from its run(s) of `method`.
    Carries `matched` (within tolerance / bracketed), `converged` (every run it is made of) and,
    for a sweep, the settings' L0s."""
    rec: dict[str, Any] = {"method": method, "target_l0": target}
    flags = [r.get("converged") for r in records]
    rec["converged"] = None if any(f is None for f in flags) else all(flags)
    if method == "interpolated":
        rec["sweep_l0"] = sorted(r["l0"] for r in records)
        values = {m: interpolate_at([(r["l0"], r[m]) for r in records if _number(r.get(m))], target) for m in metrics}
        rec["matched"] = interpolate_at([(r["l0"], r["l0"]) for r in records], target) is not None
        rec.update({m: v for m, v in values.items() if v is not None})
        if rec["matched"] and "l0" in metrics:
            rec["l0"] = float(target)  # read off at the target, by construction
        return rec
    (run,) = records
    rec.update({m: run[m] for m in metrics if _number(run.get(m))})
    rec["matched"] = method != "none" and abs(run["l0"] / target - 1) <= L0_TOLERANCE
    return rec


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def aggregate(per_seed: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Seeds' matched records of one architecture -> one row: each metric's mean (under its own
    name) and `<metric>_std/_min/_max`, `seeds`, how many seeds were matched and converged, and
    the per-seed records themselves. `matched` is true only when every seed was."""
    row: dict[str, Any] = {
        "method": per_seed[0]["method"],
        "target_l0": per_seed[0]["target_l0"],
        "seeds": [r["seed"] for r in per_seed],
        "n_seeds": len(per_seed),
        "matched": all(r["matched"] for r in per_seed),
        "matched_seeds": sum(bool(r["matched"]) for r in per_seed),
        "converged_seeds": sum(r["converged"] is True for r in per_seed),
        "convergence_known": all(r["converged"] is not None for r in per_seed),
    }
    for m in metrics:
        vals = [r[m] for r in per_seed if m in r]
        if len(vals) == len(per_seed):
            s = spread(vals)
            row[m] = s["mean"]
            row.update({f"{m}_{k}": v for k, v in s.items() if k != "mean"})
    row["per_seed"] = list(per_seed)
    return row


def rank(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Matched rows first, by mean true features recovered (desc) then mean FVU; the rest after."""
    ok = sorted((r for r in rows if r["matched"]), key=lambda r: (-r.get("recovered_fraction", 0.0), r["fvu"]))
    rest = sorted((r for r in rows if not r["matched"]), key=lambda r: r.get("architecture", ""))
    return ok + rest


def pm(row: dict[str, Any], metric: str, digits: int = 3) -> str:
    """`mean ± std` of a metric for a table cell ('' when absent)."""
    if metric not in row:
        return ""
    return f"{row[metric]:.{digits}f} ± {row.get(metric + '_std', 0.0):.{digits}f}"


def matched_rows(
    records: Iterable[dict[str, Any]], by: Sequence[str] = ("architecture",), metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """Run records (each with `seed`, `method`, `target_l0`, `converged` and the metrics) -> one
    aggregated row per `by` group (e.g. architecture, or world and architecture), in first-seen
    order, each metric interpolated / averaged as `aggregate` says. Failed runs (an `error` key)
    are left out."""
    groups: dict[tuple, dict[Any, list[dict[str, Any]]]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault(tuple(r[k] for k in by), {}).setdefault(r["seed"], []).append(r)
    rows = []
    for key, seeds in groups.items():
        per_seed = []
        for seed, runs in seeds.items():
            rec = matched_record(runs, runs[0]["method"], runs[0]["target_l0"], metrics)
            per_seed.append({"seed": seed, **rec})
        rows.append({**dict(zip(by, key)), **aggregate(per_seed, metrics)})
    return rows
