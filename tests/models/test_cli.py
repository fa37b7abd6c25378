import json

import pytest
import yaml

from saelab.cli import main
from tests.models import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny.trained_gpt2().save_pretrained(d / "model")
    tiny.make_tokenizer().save_pretrained(d / "model")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in tiny.make_texts(80)))
    return d


def test_train_fidelity_inspect_steer_harvest(tmp_path, model_dir):
    source = {
        "type": "model",
        "model": str(model_dir / "model"),
        "hookpoint": "transformer.h.0",
        "data": {"path": str(model_dir / "corpus.jsonl"), "column": "body"},
        "context_size": 16,
        "batch_size": 64,
        "buffer_tokens": 1024,
        "repeat": True,
    }
    cfg = {
        "saes": [
            {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 8},
            {"architecture": "relu", "d_in": 64, "d_sae": 128},
        ],
        "train": {"steps": 60, "progress": False, "lr_warmup_steps": 5, "norm_estimation_batches": 2},
        "source": {**source, "cache_dir": str(tmp_path / "cache")},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 0
    records = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["architecture"] for r in records] == ["topk", "relu"]
    sae = tmp_path / "run" / "00_topk" / "sae"

    assert main(["fidelity", str(sae), "--rows", "12", "--out", str(tmp_path / "fid")]) == 0
    fid = json.loads((tmp_path / "fid" / "results.json").read_text())
    assert fid["max_abs_logit_diff_with_error"] == 0.0 and fid["ce_recovered_vs_zero"] > 0.3

    assert (
        main(["inspect", str(sae), "--rows", "12", "--n-latents", "3", "--top-k", "2", "--out", str(tmp_path / "ins")])
        == 0
    )
    ins = json.loads((tmp_path / "ins" / "results.json").read_text())
    assert len(ins["latents"]) == 3 and (tmp_path / "ins" / "report.html").exists()

    assert (
        main(
            [
                "steer",
                str(sae),
                "--latent",
                "1",
                "--scale",
                "10",
                "--prompt",
                "the red",
                "--max-new-tokens",
                "4",
                "--out",
                str(tmp_path / "steer"),
            ]
        )
        == 0
    )
    assert "steered" in json.loads((tmp_path / "steer" / "results.json").read_text())

    assert (
        main(
            [
                "harvest",
                "--model",
                str(model_dir / "model"),
                "--hookpoint",
                "transformer.h.*",
                "--data",
                str(model_dir / "corpus.jsonl"),
                "--column",
                "body",
                "--context-size",
                "16",
                "--tokens",
                "300",
                "--out",
                str(tmp_path / "h"),
            ]
        )
        == 0
    )
    h = json.loads((tmp_path / "h" / "results.json").read_text())
    assert set(h["hookpoints"]) == {"transformer.h.0", "transformer.h.1"} and h["tokens"] >= 300


def test_bad_input_exits_2_with_the_problem_named(tmp_path, model_dir, capsys):
    assert (
        main(
            [
                "harvest",
                "--model",
                str(model_dir / "model"),
                "--hookpoint",
                "transformer.hh.0",
                "--data",
                str(model_dir / "corpus.jsonl"),
                "--column",
                "body",
                "--out",
                str(tmp_path / "h"),
            ]
        )
        == 2
    )
    assert "near matches: transformer.h.0" in capsys.readouterr().err
    assert (
        main(
            [
                "harvest",
                "--model",
                str(model_dir / "model"),
                "--hookpoint",
                "transformer.h.0",
                "--data",
                str(model_dir / "corpus.jsonl"),
                "--out",
                str(tmp_path / "h"),
            ]
        )
        == 2
    )
    assert "no column 'text'" in capsys.readouterr().err
