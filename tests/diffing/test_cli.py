"""`saelab diff` on a crosscoder trained on the diff_world source."""

import json

import saelab
from saelab.cli import main


def test_diff_command_writes_the_report(tmp_path, capsys):
    saelab.run(
        {
            "sae": {"architecture": "batchtopk", "d_in": 64, "d_sae": 128, "k": 3, "site": ["base", "ft"]},
            "source": {"type": "diff_world", "world": {"d": 32}, "batch_size": 512},
            "train": {"steps": 300, "progress": False, "lr": 3e-3},
        },
        out=tmp_path / "run",
    )
    assert main(["diff", str(tmp_path / "run" / "sae"), "--out", str(tmp_path / "diff"), "--batches", "2"]) == 0
    for name in (
        "results.json",
        "report.md",
        "report.html",
        "relative_norms.png",
        "shared_cosines.png",
        "nu_scatter.png",
    ):
        assert (tmp_path / "diff" / name).stat().st_size > 0
    res = json.loads((tmp_path / "diff" / "results.json").read_text())
    assert res["sites"] == {"base": "base", "ft": "ft"} and res["tokens"] == 1024
    # the world has 8 base-only and 8 fine-tune-only features; 300 steps find most of them
    assert 5 <= res["counts"]["ft_only"] <= 12 and 5 <= res["counts"]["base_only"] <= 12
    assert "ft_only" in capsys.readouterr().out


def test_diff_command_errors_name_the_problem(tmp_path, capsys):
    sae = saelab.create({"architecture": "relu", "d_in": 8, "d_sae": 4})
    saelab.save(sae, tmp_path / "sae")
    assert main(["diff", str(tmp_path / "sae"), "--out", str(tmp_path / "d")]) == 2
    assert "does not record its source" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "sae"), "--out", str(tmp_path / "d"), "--batches", "0"]) == 2
    assert "--batches" in capsys.readouterr().err
