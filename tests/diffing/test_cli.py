"""`saelab diff crosscoder` (and `saelab diff PATH`) on a crosscoder trained on the diff_world source."""

import json

import yaml

import saelab
from saelab.cli import main


def test_diff_command_writes_the_report(tmp_path, capsys):
    config = {
        "sae": {"architecture": "batchtopk", "d_in": 64, "d_sae": 128, "k": 3, "site": ["base", "ft"]},
        "source": {"type": "diff_world", "world": {"d": 32}, "batch_size": 512},
        "train": {"steps": 300, "progress": False, "lr": 3e-3},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    # a run config: the crosscoder is trained into DIR/run, then diffed
    out = tmp_path / "diff"
    assert main(["diff", "crosscoder", str(tmp_path / "run.yaml"), "--out", str(out), "--batches", "2"]) == 0
    assert (out / "run" / "sae").is_dir()
    for name in (
        "results.json",
        "report.md",
        "report.html",
        "relative_norms.png",
        "shared_cosines.png",
        "nu_scatter.png",
    ):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["sites"] == {"base": "base", "ft": "ft"} and res["tokens"] == 1024
    # the world has 8 base-only and 8 fine-tune-only features; 300 steps find most of them
    assert 5 <= res["counts"]["ft_only"] <= 12 and 5 <= res["counts"]["base_only"] <= 12
    assert "ft_only" in capsys.readouterr().out
    # `saelab diff PATH` is still the crosscoder diff of a saved folder
    assert main(["diff", str(out / "run" / "sae"), "--out", str(tmp_path / "again"), "--batches", "1"]) == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text())["tokens"] == 512


def test_diff_command_errors_name_the_problem(tmp_path, capsys):
    sae = saelab.create({"architecture": "relu", "d_in": 8, "d_sae": 4})
    saelab.save(sae, tmp_path / "sae")
    assert main(["diff", str(tmp_path / "sae"), "--out", str(tmp_path / "d")]) == 2
    assert "does not record its source" in capsys.readouterr().err
    assert main(["diff", "crosscoder", str(tmp_path / "sae"), "--out", str(tmp_path / "d"), "--batches", "0"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert main(["diff", "sideways", str(tmp_path / "sae"), "--out", str(tmp_path / "d")]) == 2
    assert "unknown diff kind 'sideways'" in capsys.readouterr().err
    assert main(["diff", "stages", "--out", str(tmp_path / "d")]) == 2
    assert "needs a config" in capsys.readouterr().err
