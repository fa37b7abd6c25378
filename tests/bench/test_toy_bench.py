"""`saelab bench toy`: plan, records, report folder, CLI, and bad configs."""

import json

import pytest
import torch

import saelab
from saelab.bench import WORLDS, BenchConfig, run_toy_bench
from saelab.bench.toy import plan, run_one
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.sae.registry import get_class, sweep_setting

REQUIRED = {"world", "architecture", "l0", "fvu", "recovered_fraction", "shrinkage", "splitting", "merging"}


def test_plan_covers_every_registered_architecture_and_sets_k_from_the_true_l0():
    cfg = BenchConfig.quick_config(worlds=["correlated"], multipliers=[0.5, 1.0, 2.0])
    jobs = plan(cfg)
    assert {j["sae"]["architecture"] for j in jobs} == set(saelab.list_architectures(one_stream=True))
    topk = [j for j in jobs if j["sae"]["architecture"] == "topk"]
    true_l0 = topk[0]["true_l0"]
    assert [j["sae"]["k"] for j in topk] == [max(1, round(true_l0 * m)) for m in (0.5, 1.0, 2.0)]
    relu = [j for j in jobs if j["sae"]["architecture"] == "relu"]
    default = get_class("relu").Config.model_fields["l1_coefficient"].default
    assert [j["sae"]["l1_coefficient"] for j in relu] == pytest.approx([default / m for m in (0.5, 1.0, 2.0)])
    assert sweep_setting("topk", 1.0, 0.2) == {"k": 1}  # never below 1


def test_a_failing_architecture_becomes_an_error_record():
    job = plan(BenchConfig.quick_config(worlds=["independent"], architectures=["topk"]))[0]
    job["sae"]["k"] = 10_000  # larger than d_sae: the config is rejected
    rec = run_one(job)
    assert "error" in rec and "k=10000" in rec["error"] and rec["architecture"] == "topk"


def test_benchmark_writes_results_report_and_plots(tmp_path):
    torch.set_num_threads(1)
    cfg = BenchConfig.quick_config(
        worlds=["hierarchical", "bundle"],
        architectures=["topk", "relu"],
        multipliers=[0.5, 1.0],
        steps=40,
        eval_tokens=1024,
        jobs=1,
    )
    result = run_toy_bench(cfg, tmp_path, log=lambda *_: None)
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == len(result.records) == 2 * 2 * 2
    for r in records:
        assert REQUIRED <= set(r), set(r)
        assert 0 <= r["recovered_fraction"] <= 1
    hier = [r for r in records if r["world"] == "hierarchical"]
    assert all({"absorption", "hedging"} <= set(r) for r in hier)
    assert all("entity_recovered" in r for r in records if r["world"] == "bundle")
    md = (tmp_path / "report.md").read_text()
    assert "## Leaderboard: hierarchical" in md and "## Pathology table" in md and "## Choosing L0" in md
    # features against parent + child composites, next to the hand-built reference dictionaries
    assert "## Parent + child composites" in md and "hierarchical: features recovered " in md
    assert "(composites dictionary)" in md and "(random dictionary)" in md and "(features dictionary)" in md
    refs = json.loads((tmp_path / "references.json").read_text())
    assert {r["dictionary"] for r in refs} == {"features", "composites", "random"}
    assert {r["world"] for r in refs} == {"hierarchical"}  # the bundle world has no hierarchy
    assert "<table>" in (tmp_path / "report.html").read_text()
    for png in ("frontier_hierarchical.png", "frontier_bundle.png", "pathologies.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_cli_runs_the_quick_benchmark(tmp_path, capsys):
    torch.set_num_threads(1)
    rc = main(
        [
            "bench",
            "toy",
            "--quick",
            "--out",
            str(tmp_path),
            "--worlds",
            "independent",
            "--architectures",
            "topk",
            "--steps",
            "30",
            "--multipliers",
            "0.5",
            "1",
            "--jobs",
            "1",
        ]
    )
    assert rc == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["world"], r["multiplier"]) for r in records] == [("independent", 0.5), ("independent", 1.0)]
    assert "recovered_fraction" in capsys.readouterr().out


def test_matched_mode_plans_and_reports_every_architecture_at_the_true_l0(tmp_path):
    torch.set_num_threads(1)
    cfg = BenchConfig.quick_config(
        worlds=["independent"],
        architectures=["topk", "jumprelu", "mdl"],
        matched_l0=True,
        multipliers=[0.25, 0.5, 1.0],
        seeds=[0, 1],
        steps=40,
        eval_tokens=1024,
        jobs=1,
    )
    jobs = plan(cfg)
    target = round(jobs[0]["true_l0"])
    assert {j["method"] for j in jobs if j["sae"]["architecture"] == "topk"} == {"k"}
    assert all(j["sae"]["k"] == target for j in jobs if j["sae"]["architecture"] == "topk")
    assert all(j["sae"]["target_l0"] == target for j in jobs if j["sae"]["architecture"] == "jumprelu")
    assert sum(j["sae"]["architecture"] == "mdl" for j in jobs) == 3 * 2  # the sweep, on each seed
    result = run_toy_bench(cfg, tmp_path, log=lambda *_: None)
    assert all("converged" in r for r in result.records)
    md = (tmp_path / "report.md").read_text()
    assert f"Every architecture at L0 = {target}" in md and "recovered (mean ± std)" in md and "matched L0" in md


def test_bad_bench_configs_name_the_field(capsys):
    with pytest.raises(ConfigError, match="unknown world"):
        BenchConfig.parse({"worlds": ["moon"]})
    with pytest.raises(ConfigError, match="multipliers"):
        BenchConfig.parse({"multipliers": [0]})
    with pytest.raises(ConfigError, match="unknown key 'step'"):
        BenchConfig.parse({"step": 3})
    with pytest.raises(ConfigError, match="unknown architecture 'nope'"):
        plan(BenchConfig.quick_config(architectures=["nope"]))
    assert main(["bench", "toy", "--worlds", "moon"]) == 2
    assert "unknown world" in capsys.readouterr().err


def test_every_named_world_builds_in_both_sizes():
    from saelab.toys.worlds import World

    for name, (full, quick) in WORLDS.items():
        for spec in (full, quick):
            w = World(spec)
            assert w.n_features >= w.expected_l0 > 0.5, name
