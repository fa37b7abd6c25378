import json

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
    assert main(["uand", "noise", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["experiment"] == "noise" and record["quick"] is True
    assert record["claims"] and all(isinstance(c["holds"], bool) for c in record["claims"])
    assert (tmp_path / "report.md").read_text().startswith("# U-AND: noise")
    assert (tmp_path / "noise.png").stat().st_size > 0


def test_scale_m_quick_scores_every_output_within_memory(tmp_path):
    from saelab.uand.experiments import run_experiment

    record = run_experiment("scale_m", tmp_path, quick=True)
    claims = {c["name"]: c for c in record["claims"]}
    assert claims["fits_memory_large_m"]["holds"] and claims["fits_memory_large_m"]["numbers"]["peak_rss_gib"] < 4
    assert claims["dense_circuit_large_m"]["holds"]
    rows = record["results"]["rows"]
    assert {r["method"] for r in rows} >= {"trained (sampled loss)", "dense_sign"}
    assert all(r["balanced_mse"] < 0.5 for r in rows)  # every row beats the zero predictor
