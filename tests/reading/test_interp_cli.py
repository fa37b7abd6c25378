"""`saelab autointerp` (through a loopback OpenAI-compatible server) and `saelab patchscope` on a tiny GPT-2."""

import json

import pytest

import saelab
from saelab.cli import main
from saelab.io.saelens import save
from tests.models import tiny

pytest.importorskip("openai")

from tests.reading import oracle  # noqa: E402
from tests.reading.loopback import Server  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("interp")
    tiny.trained_gpt2().save_pretrained(d / "model")
    tiny.make_tokenizer().save_pretrained(d / "model")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny.make_texts(120)))
    sae = saelab.create({"architecture": "topk", "d_in": 64, "d_sae": 48, "k": 6, "seed": 0})
    save(sae, d / "sae")
    flags = ["--model", str(d / "model"), "--hookpoint", "transformer.h.0", "--data", str(d / "corpus.jsonl")]
    return d, flags


@pytest.mark.slow
def test_autointerp_command_writes_results_and_report(setup, tmp_path):
    d, flags = setup
    with Server(scorer=oracle.always_yes) as srv:
        args = ["autointerp", str(d / "sae"), *flags, "--context-size", "16", "--rows", "40", "--n-latents", "3"]
        args += ["--n-explain", "4", "--n-test", "4", "--n-random", "2", "--n-hard", "2", "--window", "8"]
        args += ["--llm-base-url", srv.url, "--llm-model", "oracle", "--llm-concurrency", "2", "--out", str(tmp_path)]
        assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["latents"]) == 3 and res["client"]["model"] == "oracle"
    for r in res["latents"]:
        assert r["n_negatives"]["random"] + r["n_negatives"]["hard"] > 0 and r["n_test_activating"] > 0
        for kind in ("detection", "fuzzing"):
            assert r["scores"][kind]["balanced_accuracy"] == 0.5  # always-yes, exactly
        assert r["baseline"]["explanation_from"] != r["latent"]
    assert res["windows_checked"] > 0 and res["seconds"]["total"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "random explanation" in report and "| detection |" in report


def test_patchscope_command(setup, tmp_path, capsys):
    d, flags = setup
    args = ["patchscope", str(d / "sae"), *flags, "--latents", "1,7", "--prompt", "the cat sat on the ? and"]
    assert main([*args, "--scales", "1,4", "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["latent"] for r in res["latents"]] == [1, 7] and res["scales"] == [1.0, 4.0]
    assert (tmp_path / "report.md").read_text().startswith("# Patchscope")
    assert main([*args[:-4], "--latents", "480", "--out", str(tmp_path)]) != 0
    assert "latent(s) [480] out of range" in capsys.readouterr().err
