"""End-to-end SAEs (e2e, e2e+ds) on a tiny GPT-2 built and trained in the test suite."""

import json

import pytest
import torch
import yaml

import saelab
from saelab.errors import ConfigError
from saelab.evals.e2e import e2e_report, to_markdown
from saelab.models import ModelSource, hooks
from saelab.models.text import TokenRows, load_texts, special_ids
from saelab.sae.base import StepContext
from saelab.train.e2e import DOWNSTREAM_TERM, KL_TERM, E2EObjective, E2ESource, kl_clean_to_spliced
from saelab.train.trainer import Trainer
from tests.models import tiny

HP, DS = "transformer.h.0", "transformer.h.1"
ROWS = {"context_size": 16, "rows_per_batch": 8}
FAST = {"steps": 30, "progress": False, "lr": 3e-3, "lr_warmup_steps": 5, "log_every": 10, "norm_estimation_batches": 2}
ARCHS = {
    "relu": {"architecture": "relu", "d_in": 64, "d_sae": 96, "l1_coefficient": 1e-3},
    "topk": {"architecture": "topk", "d_in": 64, "d_sae": 96, "k": 4},
    "jumprelu": {"architecture": "jumprelu", "d_in": 64, "d_sae": 96, "init_threshold": 0.05, "bandwidth": 0.5},
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    m = tiny.trained_gpt2()
    m.zero_grad(set_to_none=True)  # the shared model keeps the grads of its own training
    return m


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


TEXTS = tiny.make_texts(300, seed=1)


def eval_rows(tok, n=4):
    rows = TokenRows(load_texts(tiny.make_texts(40, seed=9)), tok, context_size=16)
    return [rows.next_rows(8) for _ in range(n)]


def test_the_model_never_changes_nor_gets_a_gradient(model, tok):
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {**FAST, "objective": {"downstream": [DS]}}
    result = saelab.train_e2e(ARCHS["relu"], model, tok, TEXTS, HP, cfg, **ROWS)
    assert result.steps == 30
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags  # frozen only while training
    assert torch.is_grad_enabled()  # grad mode restored after the spliced forwards


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gradients_reach_every_sae_parameter_and_only_through_later_layers(arch, model, tok):
    sae = saelab.create(ARCHS[arch])
    objective = E2EObjective(model, HP, {"downstream": [DS]})
    try:
        batch = next(E2ESource(model, tok, TEXTS, HP, [DS], **ROWS))
        out = objective(sae, batch.x, StepContext(batch=batch, target=batch.x))
        assert set(out.losses) >= {KL_TERM, DOWNSTREAM_TERM} and "mse" not in out.losses
        out.loss.backward()
    finally:
        objective.release()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    assert all(p.grad is None for p in model.parameters())


def test_the_layers_before_the_hookpoint_build_no_graph(model, tok):
    """A graph through layer 0 would show as grad_fn on its output; the splice starts after it."""
    seen = {}
    handle = dict(model.named_modules())["transformer.h.0.attn"].register_forward_hook(
        lambda m, a, out: seen.__setitem__("attn", hooks.first_tensor(out).requires_grad)
    )
    objective = E2EObjective(model, "transformer.h.1", {})
    try:
        sae = saelab.create(ARCHS["topk"])
        batch = next(E2ESource(model, tok, TEXTS, "transformer.h.1", **ROWS))
        seen.clear()
        out = objective(sae, batch.x, StepContext(batch=batch, target=batch.x))
        assert seen == {"attn": False} and out.losses[KL_TERM].requires_grad
    finally:
        handle.remove()
        objective.release()


def test_kl_is_clean_to_sae_by_hand_on_one_position():
    p = torch.tensor([[0.90, 0.08, 0.02]])
    q_logits = torch.tensor([[0.0, 0.5, 3.0]])
    q = torch.softmax(q_logits, -1)
    by_hand = sum(float(p[0, v] * torch.log(p[0, v] / q[0, v])) for v in range(3))  # KL(p_clean || p_spliced)
    reverse = sum(float(q[0, v] * torch.log(q[0, v] / p[0, v])) for v in range(3))
    got = float(kl_clean_to_spliced(p.log(), q_logits))
    assert got == pytest.approx(by_hand, rel=1e-6)
    assert abs(got - reverse) > 0.1  # the two directions differ here, so the test tells them apart


def test_the_objective_kl_term_equals_the_spliced_models_kl(model, tok):
    """The loss term against an independent splice (hooks.intervene) at every attended position."""
    sae = saelab.create(ARCHS["topk"])
    objective = E2EObjective(model, HP, {"kl_coefficient": 1.0})
    try:
        batch = next(E2ESource(model, tok, TEXTS, HP, **ROWS))
        out = objective(sae, batch.x, StepContext(batch=batch, target=batch.x))
    finally:
        objective.release()
    rows = batch.context
    with torch.no_grad():
        clean = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
        with hooks.intervene(model, hooks.resolve(model, HP)[0], lambda x: sae(x), rows.keep):
            spliced = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
    p = torch.softmax(clean[rows.score], -1)
    q = torch.softmax(spliced[rows.score], -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(out.losses[KL_TERM].detach()) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.slow
def test_e2e_lowers_the_spliced_kl_below_a_local_sae_of_equal_l0(model, tok):
    """TopK k=2 on both sides (equal L0 by construction), same width, seed, steps and tokens per step
    (8 rows of 16 tokens vs 120 activations), 3 seeds, scored on held-out rows. Over 6 seeds the KL
    ratio e2e/local was 0.23-0.79 (mean 0.44, sd 0.19): every seed must be below 1 and the mean of 3
    below 0.7 (2.3 standard errors above the mean seen). The local SAE keeps the better hookpoint
    reconstruction (e2e optimises something else). The regime matters: at k=4, or at k=2 with 300
    steps, the local SAE of this tiny model catches up or wins (KL ~0.001 nats either way)."""
    batches, specials = eval_rows(tok), special_ids(tok)
    ratios = []
    for seed in range(3):
        sae_cfg = {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 2, "seed": seed}
        cfg = {**FAST, "steps": 150, "log_every": 1000, "norm_estimation_batches": 8, "seed": seed}
        e2e = saelab.train_e2e(sae_cfg, model, tok, TEXTS, HP, cfg, **ROWS).sae
        src = ModelSource(
            model, tok, TEXTS, HP, context_size=16, batch_size=120, buffer_tokens=1200, repeat=True, seed=seed
        )
        local = saelab.train(sae_cfg, src, cfg).sae
        e, loc = e2e_report({"e2e": e2e, "local": local}, model, HP, batches, [DS], specials)
        assert e.l0 == loc.l0 == 2.0
        assert loc.explained_variance > e.explained_variance
        ratios.append(e.kl_clean_spliced / loc.kl_clean_spliced)
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.7, ratios


def test_e2e_ds_has_a_downstream_term_that_decreases(model, tok):
    cfg = {**FAST, "steps": 60, "objective": {"downstream": [DS], "downstream_coefficient": 2.0}}
    result = saelab.train_e2e(ARCHS["topk"], model, tok, TEXTS, HP, cfg, **ROWS)
    terms = [r["losses"] for r in result.history]
    assert all(DOWNSTREAM_TERM in t and KL_TERM in t and "mse" not in t for t in terms)
    assert terms[-1][DOWNSTREAM_TERM] < 0.7 * terms[0][DOWNSTREAM_TERM]
    pure = saelab.train_e2e(ARCHS["topk"], model, tok, TEXTS, HP, {**FAST, "steps": 10}, **ROWS)
    assert DOWNSTREAM_TERM not in pure.history[-1]["losses"]


class KilledSource(E2ESource):
    def __init__(self, *args, kill_at, **kw):
        super().__init__(*args, **kw)
        self.kill_at = kill_at

    def __next__(self):
        if self.position == self.kill_at:
            raise KeyboardInterrupt
        return super().__next__()


def test_a_killed_e2e_run_resumes_to_the_same_weights(model, tok, tmp_path):
    from saelab.train.trainer import TrainConfig

    cfg = TrainConfig.parse({**FAST, "checkpoint_every": 10, "objective": {"downstream": [DS]}})

    def run(source, out):
        objective = E2EObjective(model, HP, cfg.objective)
        try:
            sae = saelab.create(ARCHS["jumprelu"])
            Trainer(sae, source, cfg, out, objective=objective).fit()
            return sae
        finally:
            objective.release()

    straight = run(E2ESource(model, tok, TEXTS, HP, [DS], **ROWS), tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(KilledSource(model, tok, TEXTS, HP, [DS], kill_at=17, **ROWS), tmp_path / "b")
    resumed = run(E2ESource(model, tok, TEXTS, HP, [DS], **ROWS), tmp_path / "b")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    log = [json.loads(line)["losses"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(t) for t in log] == [sorted([KL_TERM, DOWNSTREAM_TERM, "l0"])] * 3


def test_bad_input_is_named_before_training(model, tok):
    with pytest.raises(ConfigError, match=r"downstream: hookpoint transformer\.h\.0 runs before"):
        saelab.train_e2e(ARCHS["topk"], model, tok, TEXTS, DS, {**FAST, "objective": {"downstream": [HP]}}, **ROWS)
    with pytest.raises(ConfigError, match="lists the SAE's own hookpoint"):
        E2EObjective(model, HP, {"downstream": [HP]})
    with pytest.raises(ConfigError, match="no model was given"):
        saelab.train(ARCHS["topk"], [torch.randn(8, 64)] * 4, {**FAST, "objective": "e2e"})
    assert all(p.requires_grad for p in model.parameters())  # nothing stayed frozen after the errors


def test_the_report_table_has_every_column(model, tok):
    sae = saelab.train_e2e(ARCHS["topk"], model, tok, TEXTS, HP, {**FAST, "steps": 10}, **ROWS).sae
    rows = e2e_report({"e2e": sae}, model, HP, eval_rows(tok, 2), [DS], special_ids(tok))
    (row,) = rows
    assert row.l0 == 4.0 and 0 < row.alive_fraction <= 1 and row.positions > 0
    assert row.ce_increase == pytest.approx(row.ce_sae - row.ce_clean) and row.kl_clean_spliced > 0
    assert set(row.downstream_explained_variance) == {DS}
    table = to_markdown(rows)
    assert "KL(clean‖spliced)" in table and f"EV {DS}" in table and table.count("\n") == 3


@pytest.mark.slow
def test_saelab_train_config_runs_e2e(tmp_path):
    from saelab.cli import main

    d = tmp_path / "model"
    tiny.trained_gpt2().save_pretrained(d)
    tiny.make_tokenizer().save_pretrained(d)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = {
        "sae": {"architecture": "topk", "d_sae": 96, "k": 4},
        "train": {**FAST, "steps": 10, "objective": {"downstream": [DS]}},
        "source": {
            "type": "model",
            "model": str(d),
            "hookpoint": HP,
            "data": {"path": str(tmp_path / "corpus.jsonl")},
            "context_size": 16,
            "model_batch_size": 4,
            "repeat": True,
        },
        "eval": {"batches": 2},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 0
    (record,) = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["e2e_l0"] == 4.0 and record["e2e_kl_clean_spliced"] > 0
    assert f"e2e_explained_variance.{DS}" in record
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert KL_TERM in log[-1]["losses"] and DOWNSTREAM_TERM in log[-1]["losses"]


def test_a_sweep_trains_end_to_end_from_one_stream(model, tok):
    saes = {"topk": ARCHS["topk"], "relu": ARCHS["relu"]}
    results = saelab.train_e2e(saes, model, tok, TEXTS, HP, {**FAST, "steps": 10}, **ROWS)
    assert sorted(results) == ["relu", "topk"]
    assert KL_TERM in results["relu"].history[-1]["losses"] and "l1" in results["relu"].history[-1]["losses"]


def test_an_e2e_run_config_needs_a_model_source(tmp_path):
    with pytest.raises(ConfigError, match="the source must be `type: model`"):
        saelab.run(
            {
                "sae": {"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 2},
                "train": {"steps": 2, "objective": "e2e", "progress": False},
                "source": {"type": "world", "world": {"d": 16}},
            },
            out=tmp_path,
        )


def test_the_splice_undoes_the_input_scale_as_the_saved_sae_does(model, tok):
    """Training sees x * s and splices x_hat / s; the SAE with s folded in (what training returns)
    spliced on raw activations gives the same KL term."""
    import copy

    s = 0.37
    sae = saelab.create(ARCHS["relu"])
    folded = copy.deepcopy(sae)
    folded.fold_scales(s, s)
    objective = E2EObjective(model, HP, {})
    try:
        batch = next(E2ESource(model, tok, TEXTS, HP, **ROWS))
        scaled = objective(sae, batch.x * s, StepContext(batch=batch, target=batch.x * s, input_factor=s))
        raw = objective(folded, batch.x, StepContext(batch=batch, target=batch.x))
    finally:
        objective.release()
    assert float(scaled.losses[KL_TERM].detach()) == pytest.approx(float(raw.losses[KL_TERM].detach()), rel=1e-4)
    assert torch.allclose(scaled.x_hat / s, raw.x_hat, atol=1e-4)
