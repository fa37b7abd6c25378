"""The `saelab` command: demo, train, eval, and clear errors for bad input."""

import json

import pytest

import saelab
from saelab.cli import main

REQUIRED = {"architecture", "l0", "fvu", "dead_fraction", "shrinkage", "recovered_fraction"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    return out


def test_demo_ranks_every_architecture_at_the_matched_l0_with_seed_spread(demo_dir):
    rows = json.loads((demo_dir / "results.json").read_text())
    assert sorted(r["architecture"] for r in rows) == saelab.list_architectures(one_stream=True)
    target = rows[0]["target_l0"]
    assert target == 3.0  # the quick world's true L0 (3.2), rounded
    ranked = [r for r in rows if r["matched"]]
    assert ranked and rows[: len(ranked)] == ranked  # matched rows come first
    recovered = [r["recovered_fraction"] for r in ranked]
    assert recovered == sorted(recovered, reverse=True)
    for r in ranked:
        assert REQUIRED <= set(r)
        assert r["n_seeds"] == 2 and len(r["per_seed"]) == 2 and "fvu_std" in r
        assert all(abs(s["l0"] / target - 1) <= 0.1 for s in r["per_seed"])
        assert r["method"] in ("k", "target_l0", "interpolated")
    assert {r["method"] for r in rows if r["architecture"] in ("pca", "ica", "nmf")} == {"none"}
    runs = json.loads((demo_dir / "sweep.json").read_text())
    assert {r["seed"] for r in runs} == {0, 1} and all("converged" in r for r in runs)
    assert (demo_dir / "frontier.png").stat().st_size > 1000
    md = (demo_dir / "leaderboard.md").read_text()
    assert "Leaderboard at L0 = 3" in md and " ± " in md and "Seeds [0, 1]" in md and "Converged" in md
    assert all(a in md for a in saelab.list_architectures(one_stream=True))


def test_eval_reads_a_saved_sae_and_its_source(demo_dir, tmp_path, capsys):
    sae_dir = json.loads((demo_dir / "sweep.json").read_text())[0]["path"]
    assert main(["eval", str(sae_dir), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert REQUIRED - {"dead_fraction"} <= set(record)


def test_train_from_yaml_then_resume_is_a_no_op(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "sae: {architecture: topk, d_in: 16, d_sae: 32, k: 3}\n"
        "train: {steps: 30, progress: false, norm_estimation_batches: 2}\n"
        "source: {type: toy, world: {n_features: 32, d: 16, firing_prob: 0.08}, batch_size: 64}\n"
    )
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())[0]
    assert first["train_steps"] == 30 and (out / "sae" / "cfg.json").exists()
    sae = saelab.load(out / "sae")
    assert sae.cfg.k == 3
    assert main(["train", str(cfg), "--out", str(out)]) == 0  # resumes at step 30: nothing to do
    again = json.loads((out / "results.json").read_text())[0]
    assert again["fvu"] == pytest.approx(first["fvu"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("sae: {architecture: relu3, d_in: 4, d_sae: 8}\n", "valid architectures: archetypal, batchtopk"),
        ("sae: {architecture: topk, d_in: 4, d_sae: 8, k: 9}\n", "k=9 is larger than d_sae=8"),
        ("sae: {architecture: relu, d_in: 4, d_sae: 8}\ntrain: {stepz: 3}\n", "unknown key 'stepz'"),
        ("sae: {architecture: relu, d_in: 4, d_sae: 8}\nsource: {type: web}\n", "unknown source type 'web'"),
        ("sae: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_configs_fail_before_training_with_a_clear_message(text, message, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_eval_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_eval_source_is_what_the_held_out_metrics_use(tmp_path):
    base = (
        "sae: {architecture: topk, d_in: 16, d_sae: 32, k: 3}\n"
        "train: {steps: 400, progress: false, norm_estimation_batches: 2}\n"
        "source: {type: toy, world: {n_features: 32, d: 16, firing_prob: 0.08}, batch_size: 256}\n"
    )
    # the same statistics but other feature directions: the trained dictionary does not fit them
    other = "eval_source: {type: toy, world: {n_features: 32, d: 16, firing_prob: 0.08, seed: 7}, batch_size: 256}\n"
    records = []
    for name, text in (("same", base), ("other", base + other)):
        (tmp_path / f"{name}.yaml").write_text(text)
        assert main(["train", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
        records.append(json.loads((tmp_path / name / "results.json").read_text())[0])
    same, foreign = records
    assert foreign["fvu"] > same["fvu"]
    assert foreign["mmcs_decoder"] < same["mmcs_decoder"] - 0.1, (same["mmcs_decoder"], foreign["mmcs_decoder"])
