import json

import pytest
import torch

from saelab.cli import main
from saelab.uand.data import DataConfig, UANDTask
from saelab.uand.metrics import evaluate
from saelab.uand.model import ModelConfig, TrainConfig, UANDModel, train
from saelab.uand.readout import collect_stats, solve_readout


def test_xor_from_and_trained_layer_beats_raw_inputs():
    task = UANDTask(DataConfig(m=12, s=2))
    model = UANDModel.for_task(task, ModelConfig(d=60))
    train(model, task, TrainConfig(steps=300, batch_size=128, lr=1e-2))
    xor = task.with_op("xor")
    x, inputs = xor.sample(1000, torch.Generator().manual_seed(5))
    scores = {}
    for name, hidden in {"trained": model.hidden, "raw": lambda inp: inp}.items():
        stats = collect_stats(hidden, xor, 10000, torch.Generator().manual_seed(1))
        R, c = solve_readout(stats, xor)
        with torch.no_grad():
            scores[name] = evaluate(lambda h: h @ R.T + c, xor, x, hidden(inputs))
    assert scores["trained"].worst_cell_acc > scores["raw"].worst_cell_acc + 0.3
    assert scores["trained"].balanced_mse < 0.5 * scores["raw"].balanced_mse


def test_cli_help_lists_experiments(capsys):
    try:
        main(["uand", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for name in ("scaling", "constructions", "frozen", "truth_tables", "noise", "superposition", "scale_m", "all"):
        assert name in out


def test_cli_quick_experiment_writes_results(tmp_path, capsys):
    assert main(["uand", "noise", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["experiment"] == "noise" and record["quick"] is True
    assert record["claims"] and all(isinstance(c["holds"], bool) for c in record["claims"])
    assert (tmp_path / "report.md").read_text().startswith("# U-AND: noise")
    assert (tmp_path / "noise.png").stat().st_size > 0


def test_scale_m_quick_scores_every_output_within_memory(tmp_path):
    from saelab.uand.experiments import run_experiment

    record = run_experiment("scale_m", tmp_path, quick=True, seeds=1)
    claims = {c["name"]: c for c in record["claims"]}
    assert claims["fits_memory_large_m"]["holds"] and claims["fits_memory_large_m"]["numbers"]["peak_rss_gib"] < 4
    assert claims["dense_circuit_large_m"]["holds"]
    rows = record["results"]["rows"]
    assert {r["method"] for r in rows} >= {"trained (sampled loss)", "dense_sign"}
    assert all(r["balanced_mse"] < 0.5 for r in rows)  # every row beats the zero predictor


def _tiny_scale(quick: bool):
    from saelab.uand.experiments import Scale

    return Scale(
        m=10, s=2, d_grid=[4, 16], d=8, d_wide=16, steps=30, batch_size=64, n_eval=200, n_fit=2000,
        s_grid=[2, 3], m_grid=[8, 10], seeds=2, m_big=40, d_big=8, d_big_grid=[8, 16], steps_big=10,
        batch_big=16, output_sample=64, n_eval_big=50,
    )  # fmt: skip


def test_every_experiment_records_the_linear_floor_beside_its_results(tmp_path, monkeypatch):
    from saelab.uand import experiments
    from saelab.uand.readout import linear_floor

    monkeypatch.setattr(experiments.Scale, "make", classmethod(lambda cls, quick: _tiny_scale(quick)))
    floor = linear_floor(UANDTask(DataConfig(m=10, s=2))).metrics.balanced_mse
    for name in experiments.EXPERIMENTS:
        record = experiments.run_experiment(name, tmp_path / name)
        assert record["seeds"] == [0, 1] and set(record["results_per_seed"]) == {0, 1}
        tables = [rows for rows in record["results"].values() if isinstance(rows, list) and rows]
        tables = [rows for rows in tables if all(isinstance(r, dict) and "balanced_mse" in r for r in rows)]
        assert tables, name
        for rows in tables:
            if name == "truth_tables":  # any table, cell-balanced: exact floor rows beside the fitted ones
                floors = {r["table"] for r in rows if r.get("hidden") == "raw_inputs_exact"}
                assert floors >= {"AND", "XOR"} or all(r["table"] == "XOR" for r in rows)
                continue
            for r in rows:
                assert r["floor_mse"] > 0 and r["over_floor"] == pytest.approx(r["balanced_mse"] / r["floor_mse"])
        for claim in record["claims"]:
            if claim["name"] != "fits_memory_large_m":  # about memory, not about a loss
                assert any("floor" in key for key in claim["numbers"]), (name, claim["name"])
            assert claim["numbers"]["holds_in_seeds"].endswith("/2")
        assert "floor" in (tmp_path / name / "report.md").read_text()
    scaling = json.loads((tmp_path / "scaling" / "results.json").read_text())
    assert [r["floor_mse"] for r in scaling["results"]["by_d"]] == pytest.approx([floor, floor])


def test_a_claim_holds_only_if_it_holds_in_every_seed():
    from saelab.uand.experiments import Claim, combine_claims

    claims = combine_claims(
        [[Claim("c", "s", "x < 1", True, {"x": 0.5, "d": 3})], [Claim("c", "s", "x < 1", False, {"x": 1.5, "d": 3})]],
        [0, 1],
    )
    (claim,) = claims
    assert not claim.holds and claim.numbers["holds_in_seeds"] == "1/2"
    assert claim.numbers["x"] == pytest.approx(1.0) and claim.numbers["x_sd"] == pytest.approx(0.5**0.5)
    assert claim.numbers["d"] == 3 and "d_sd" not in claim.numbers
