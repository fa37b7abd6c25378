"""Downstream evaluation wired into `saelab.run` (eval.downstream) and `saelab fidelity`, on a tiny
model saved to a folder (no download)."""

import json

import pytest
import torch

import saelab
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.evals.splice import fidelity_from_spec
from saelab.io.formats import save
from saelab.run import RunConfig
from tests.models import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tiny")
    tiny.trained_gpt2().save_pretrained(d / "model")
    tiny.make_tokenizer().save_pretrained(d / "model")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in tiny.make_texts(80)))
    return d


def _source(model_dir, **extra):
    return {
        "type": "model",
        "model": str(model_dir / "model"),
        "hookpoint": "transformer.h.0",
        "data": {"path": str(model_dir / "corpus.jsonl"), "column": "body"},
        "context_size": 16,
        "batch_size": 64,
        "buffer_tokens": 1024,
        "repeat": True,
        **extra,
    }


def test_run_writes_downstream_numbers_when_asked(tmp_path, model_dir):
    cfg = {
        "sae": {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 8},
        "train": {"steps": 60, "progress": False, "lr_warmup_steps": 5, "norm_estimation_batches": 2},
        "source": _source(model_dir),
        "eval": {"batches": 2, "downstream": {"rows": 8, "skip_docs": 40}},
    }
    (record,) = saelab.run(cfg, tmp_path / "run")
    d = record["downstream"]
    assert d["kind"] == "sae" and d["hookpoint"] == "transformer.h.0" and d["rows"] == 8
    assert d["max_abs_logit_diff_with_error"] == 0.0 and d["ce_zero_ablation"] > d["ce_clean"]
    assert d["model"] == str(model_dir / "model")
    # without `downstream` the record has none (and no model forward is spent on it)
    del cfg["eval"]["downstream"]
    (plain,) = saelab.run(cfg, tmp_path / "run2")
    assert "downstream" not in plain


def test_downstream_needs_a_model_source():
    with pytest.raises(ConfigError, match="downstream splices the dictionary into a model.*'world' source"):
        RunConfig.parse({"sae": {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2}, "eval": {"downstream": True}})
    with pytest.raises(ConfigError, match="unknown key 'rowz'.*valid keys: per_site, rows, skip_docs"):
        RunConfig.parse(
            {
                "sae": {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2},
                "source": {"type": "model", "model": "m", "hookpoint": "h"},
                "eval": {"downstream": {"rowz": 3}},
            }
        )


def test_fidelity_command_splices_a_transcoder_and_a_crosscoder(tmp_path, model_dir):
    meta = {"saelab_source": _source(model_dir)}
    tc = saelab.create(
        {
            "architecture": "topk",
            "d_in": 64,
            "d_sae": 64,
            "k": 4,
            "site": "transformer.h.1.mlp:input",
            "write_site": "transformer.h.1.mlp",
            "skip": True,
        }
    )
    save(tc, tmp_path / "tc", metadata=meta)
    assert main(["fidelity", str(tmp_path / "tc"), "--rows", "8", "--out", str(tmp_path / "f1")]) == 0
    rec = json.loads((tmp_path / "f1" / "results.json").read_text())
    assert rec["kind"] == "skip_transcoder" and rec["spliced"]["sites"] == ["transformer.h.1.mlp"]
    assert "KL(p_clean || p_spliced)" in rec["kl_direction"] and rec["max_abs_logit_diff_with_error"] == 0.0
    assert {"ce_recovered_vs_zero", "ce_recovered_vs_mean", "top1_agreement_spliced"} <= set(rec["spliced"])
    assert "skip_only" in rec

    cc = saelab.create(
        {"architecture": "topk", "d_in": 128, "d_sae": 64, "k": 4, "site": ["transformer.h.0", "transformer.h.1"]}
    )
    save(cc, tmp_path / "cc", metadata=meta)
    out = tmp_path / "f2"
    assert main(["fidelity", str(tmp_path / "cc"), "--rows", "6", "--no-per-site", "--out", str(out)]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["kind"] == "crosscoder" and rec["spliced"]["sites"] == ["transformer.h.0", "transformer.h.1"]
    assert "per_site" not in rec


def test_run_splices_a_transcoder_trained_on_a_two_site_source(tmp_path, model_dir):
    source = _source(model_dir)
    del source["hookpoint"]
    source["hookpoints"] = ["transformer.h.1.mlp:input", "transformer.h.1.mlp"]
    cfg = {
        "sae": {
            "architecture": "topk",
            "d_sae": 128,
            "k": 8,
            "site": "transformer.h.1.mlp:input",
            "write_site": "transformer.h.1.mlp",
        },
        "train": {"steps": 60, "progress": False, "lr_warmup_steps": 5, "norm_estimation_batches": 2},
        "source": source,
        "eval": {"batches": 2, "downstream": {"rows": 8, "skip_docs": 40}},
    }
    (record,) = saelab.run(cfg, tmp_path / "run")
    d = record["downstream"]
    assert d["kind"] == "transcoder" and d["spliced"]["sites"] == ["transformer.h.1.mlp"]
    assert d["max_abs_logit_diff_with_error"] == 0.0 and 0 < d["spliced"]["top1_agreement_spliced"] <= 1
    # the trained transcoder beats a fresh one spliced in the same place
    fresh = saelab.create({**cfg["sae"], "d_in": 64})
    fresh_record = fidelity_from_spec(fresh, {**source, "type": "model"}, rows=8, skip_docs=40)
    assert d["spliced"]["kl_clean_spliced"] < fresh_record["spliced"]["kl_clean_spliced"]
    # and `saelab fidelity` on the saved folder reads the same sites from the recorded source
    assert main(["fidelity", record["path"], "--rows", "8", "--skip-docs", "40", "--out", str(tmp_path / "f")]) == 0
    again = json.loads((tmp_path / "f" / "results.json").read_text())
    assert again["spliced"]["kl_clean_spliced"] == pytest.approx(d["spliced"]["kl_clean_spliced"], rel=1e-5)


def test_fidelity_command_scores_a_saved_clt_as_a_replacement_model(tmp_path, model_dir):
    clt = saelab.create(
        {
            "architecture": "clt_jumprelu",
            "d_in": 128,
            "d_sae": 128,
            "init_threshold": 0.1,
            "site": [f"transformer.h.{i}.mlp:input" for i in range(2)],
            "write_site": [f"transformer.h.{i}.mlp" for i in range(2)],
        }
    )
    save(clt, tmp_path / "clt", metadata={"saelab_source": _source(model_dir)})
    assert main(["fidelity", str(tmp_path / "clt"), "--rows", "6", "--out", str(tmp_path / "f")]) == 0
    rec = json.loads((tmp_path / "f" / "results.json").read_text())
    assert rec["kind"] == "cross_layer_transcoder" and {"spliced", "open_loop", "per_site"} <= set(rec)
    assert rec["spliced"]["sites"] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
