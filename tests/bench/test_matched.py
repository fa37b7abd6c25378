"""Matched-L0 comparison: the plan per architecture, the interpolation, convergence and seed spread."""

import math
import statistics

import pytest

import saelab
from saelab.bench.matched import (
    aggregate,
    convergence,
    interpolate_at,
    matched_record,
    matched_rows,
    matched_settings,
    rank,
    target_from,
)
from saelab.commands import demo_plan
from saelab.errors import ConfigError
from saelab.sae.registry import get_class


def test_each_family_gets_its_method():
    assert matched_settings("topk", 5.0) == ("k", [{"k": 5}])
    assert matched_settings("batchtopk", 5.0) == ("k", [{"k": 5}])
    assert matched_settings("topk", 4.5) == ("interpolated", [{"k": 4}, {"k": 5}])  # k on either side
    for arch in ("relu", "gated", "jumprelu"):
        assert matched_settings(arch, 5.0) == ("target_l0", [{"target_l0": 5.0}])
    method, settings = matched_settings("mdl", 5.0, (0.25, 0.5, 1.0))
    default = get_class("mdl").Config.model_fields["dl_coefficient"].default
    assert method == "interpolated"
    assert [s["dl_coefficient"] for s in settings] == pytest.approx([default * 4, default * 2, default])
    assert matched_settings("pca", 5.0) == ("none", [{}])
    assert target_from(5.12) == 5.0 and target_from(0.3) == 1.0 and target_from(5.12, 7.5) == 7.5
    with pytest.raises(ConfigError, match="positive"):
        target_from(5.0, -1.0)


def test_the_demo_plans_every_architecture_at_the_true_l0_on_every_seed():
    plan = demo_plan(1500, quick=True, seed=4, seeds=3)
    assert plan["target_l0"] == round(plan["true_l0"]) == 3
    assert plan["seeds"] == [4, 5, 6]
    archs = saelab.list_architectures(one_stream=True)
    for seed in plan["seeds"]:
        runs = [r for r in plan["runs"] if r["seed"] == seed]
        assert sorted({r["architecture"] for r in runs}) == archs
        assert all(r["sae"]["seed"] == seed for r in runs)
        for r in runs:
            cls = get_class(r["architecture"])
            if r["method"] == "k":
                assert cls.sweep_kind == "count" and r["sae"][cls.sweep_parameter] == 3
            elif r["method"] == "target_l0":
                assert r["sae"]["target_l0"] == 3.0
        interpolated = {r["architecture"] for r in runs if r["method"] == "interpolated"}
        assert interpolated and all(sum(x["architecture"] == a for x in runs) >= 2 for a in interpolated)
    assert demo_plan(1500, quick=True, seed=0, seeds=1, l0=8)["target_l0"] == 8.0
    with pytest.raises(ConfigError, match="--seeds"):
        demo_plan(1500, quick=True, seed=0, seeds=0)


@pytest.mark.parametrize("a, b", [(0.1, 0.3), (0.9, -0.2), (2.0, 0.0)])
def test_interpolation_is_exact_on_a_frontier_linear_in_log_l0(a, b):
    value = lambda l0: a + b * math.log(l0)  # noqa: E731
    points = [(l0, value(l0)) for l0 in (16.0, 2.0, 7.0, 3.5)]  # unsorted on purpose
    for target in (2.5, 3.5, 5.0, 11.0):
        assert interpolate_at(points, target) == pytest.approx(value(target), abs=1e-12)
    assert interpolate_at(points, 2.0) == value(2.0)  # a point at the target: its own value


def test_interpolation_never_extrapolates():
    points = [(2.0, 0.5), (4.0, 0.3)]
    assert interpolate_at(points, 1.9) is None
    assert interpolate_at(points, 4.1) is None
    assert interpolate_at([], 3.0) is None
    assert interpolate_at([(0.0, 1.0), (4.0, 0.3)], 2.0) is None  # L0 0 has no log: not a bracket


def _history(fvu, steps=1000, every=10):
    return [{"step": s, "fvu": fvu(s)} for s in range(every, steps + 1, every)]


def test_convergence_compares_the_last_two_windows_before_the_decay():
    flat = convergence(_history(lambda s: 0.2), 1000, 0.2)
    assert flat["converged"] is True and flat["fvu_change"] == pytest.approx(0.0)
    falling = convergence(_history(lambda s: 1.0 / s), 1000, 0.2)  # falls by 29% between them
    assert falling["converged"] is False and falling["fvu_change"] == pytest.approx(
        math.log(4 / 3) / math.log(1.5) - 1, rel=0.05
    )
    # a drop only inside the decay (after step 800) does not count against convergence
    decayed = convergence(_history(lambda s: 0.2 if s <= 800 else 0.1), 1000, 0.2)
    assert decayed["converged"] is True
    assert convergence(_history(lambda s: 0.2, every=500), 1000, 0.2)["converged"] is None


def _run(seed, l0, recovered, method="k", converged=True):
    return {
        "architecture": "a",
        "seed": seed,
        "method": method,
        "target_l0": 5.0,
        "converged": converged,
        "l0": l0,
        "fvu": 0.1 * l0,
        "recovered_fraction": recovered,
    }


def test_a_sweep_is_read_off_at_the_target_or_marked_not_bracketed():
    runs = [_run(0, 2.5, 0.5, "interpolated"), _run(0, 10.0, 0.9, "interpolated")]
    rec = matched_record(runs, "interpolated", 5.0)
    assert rec["matched"] and rec["l0"] == pytest.approx(5.0)
    assert rec["recovered_fraction"] == pytest.approx(0.7)  # halfway in log L0
    assert rec["sweep_l0"] == [2.5, 10.0]
    high = matched_record([_run(0, 6.0, 0.5, "interpolated"), _run(0, 9.0, 0.9, "interpolated")], "interpolated", 5.0)
    assert not high["matched"] and "recovered_fraction" not in high
    assert not matched_record([_run(0, 5.6, 0.5)], "k", 5.0)["matched"]  # 12% off the target
    assert matched_record([_run(0, 5.4, 0.5)], "k", 5.0)["matched"]


def test_rows_carry_the_seed_spread_and_rank_matched_rows_first():
    recovered = {0: 0.8, 1: 0.7, 2: 0.9}
    runs = [_run(s, 5.0, r, converged=s != 1) for s, r in recovered.items()]
    runs += [{**_run(s, 5.0, 0.95), "architecture": "b"} for s in (0, 1)]
    runs += [{**_run(s, 9.0, 0.99), "architecture": "c"} for s in (0, 1, 2)]  # off target: not ranked
    rows = rank(matched_rows(runs))
    assert [r["architecture"] for r in rows] == ["b", "a", "c"]
    a = rows[1]
    assert a["n_seeds"] == 3 and a["seeds"] == [0, 1, 2] and len(a["per_seed"]) == 3
    assert a["recovered_fraction"] == pytest.approx(0.8)
    assert a["recovered_fraction_std"] == pytest.approx(statistics.stdev(recovered.values()))
    assert a["recovered_fraction_min"] == 0.7 and a["recovered_fraction_max"] == 0.9
    assert a["converged_seeds"] == 2 and a["matched"]
    assert rows[2]["matched"] is False
    assert aggregate([{"seed": 0, **matched_record([_run(0, 5.0, 0.5)], "k", 5.0)}])["recovered_fraction_std"] == 0.0
