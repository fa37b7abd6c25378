"""Stage-wise model diffing: warm starts, the stages, their null, bad input and the CLI."""

import copy
import json

import pytest
import torch

import saelab
from saelab.activations.factory import build_source
from saelab.diffing.stages import SOURCE_KEYS, TRANSITIONS, StagesResult, train_stages
from saelab.errors import ConfigError
from saelab.train import TrainConfig, WarmStart, train

WORLD = {"d": 16, "n_shared": 16, "n_base_only": 4, "n_ft_only": 4, "n_rescaled": 4, "n_recombined": 4}
FAST = {"progress": False, "lr": 3e-3, "log_every": 25}


def world_sources(seed: int = 0, world: dict = WORLD, batch_size: int = 256) -> dict:
    return {
        k: {"type": "diff_world", "world": world, "stage": k, "batch_size": batch_size, "seed": seed}
        for k in SOURCE_KEYS
    }


def toy_batches(n: int = 80, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(48, d, generator=gen), dim=1)
    out = []
    for _ in range(n):
        f = (torch.rand(256, 48, generator=gen) < 0.06) * torch.rand(256, 48, generator=gen)
        out.append(3.0 * f @ dirs + 0.5)  # an offset and a scale away from sqrt(d), so scale and b_dec matter
    return out


@pytest.fixture(scope="module")
def trained():
    data = toy_batches()
    return data, {
        arch: train({"architecture": arch, "d_in": 16, "d_sae": 64, **extra}, data, {"steps": 60, **FAST})
        for arch, extra in (("relu", {}), ("topk", {"k": 4}))
    }


# ---------------------------------------------------------------------------- warm starts
def test_a_warm_start_at_lr_0_returns_the_dictionary_unchanged(trained):
    """lr 0 on the data S was trained on: no b_dec or data init, the scale it is given, no change.
    Bit for bit with a free decoder (ReLU's penalty mode); a unit-norm decoder (TopK) is
    renormalised after each step, which moves rows by float32 rounding only."""
    data, results = trained
    for arch, r in results.items():
        cfg = TrainConfig.parse({"steps": 20, **FAST}).model_copy(update={"lr": 0.0})
        before = {k: v.clone() for k, v in r.sae.state_dict().items()}
        warm = train(copy.deepcopy(r.sae), data, cfg, warm_start=WarmStart(r.input_scale))
        assert warm.input_scale == r.input_scale and warm.steps == 20
        after = warm.sae.state_dict()
        if arch == "relu":
            assert all(torch.equal(before[k], after[k]) for k in before)
        else:
            assert max(float((before[k] - after[k]).abs().max()) for k in before) <= 1e-6
        # the same SAE trained without a warm start is re-initialised from the data (b_dec moves)
        fresh = train(copy.deepcopy(r.sae), data, cfg)
        assert not torch.equal(fresh.sae.b_dec, before["b_dec"])


def test_a_warm_start_keeps_its_scale_and_full_sparsity(trained):
    data, results = trained
    r = results["relu"]
    doubled = 2 * r.input_scale
    warm = train(copy.deepcopy(r.sae), data, {"steps": 25, **FAST}, warm_start=WarmStart(doubled))
    assert warm.input_scale == doubled and warm.site_scales == {"": doubled}
    assert warm.history[0]["sparsity_scale"] == 1.0  # no sparsity warm-up (a fresh run starts near 0)
    fresh = train({"architecture": "relu", "d_in": 16, "d_sae": 64}, data, {"steps": 25, **FAST})
    assert fresh.history[0]["sparsity_scale"] < 0.2


def test_a_warm_start_never_resamples_dead_latents(trained):
    """A latent made dead (zero encoder column, very negative bias) is resampled by a normal run
    with a short revival period, never by a warm start, whose dead latent keeps its weights."""
    data, results = trained
    sae = copy.deepcopy(results["relu"].sae)
    with torch.no_grad():
        sae.W_enc[:, :8] = 0
        sae.b_enc[:8] = -100.0
    cfg = {"steps": 30, "dead_after_tokens": 512, "revive_every_tokens": 512, "lr_decay_fraction": 0.0, **FAST}
    normal = train(copy.deepcopy(sae), data, cfg)
    assert normal.history[-1]["revived_total"] >= 8
    warm = train(copy.deepcopy(sae), data, cfg, warm_start=WarmStart(results["relu"].input_scale))
    assert warm.history[-1]["revived_total"] == 0
    assert torch.equal(warm.sae.W_dec[:8], sae.W_dec[:8]) and torch.equal(warm.sae.b_enc[:8], sae.b_enc[:8])


def test_warm_start_errors_name_the_problem(trained, tmp_path):
    data, results = trained
    r = results["relu"]
    with pytest.raises(ConfigError, match="positive"):
        train(copy.deepcopy(r.sae), data, {"steps": 2, **FAST}, warm_start=WarmStart(-1.0))
    with pytest.raises(ConfigError, match="no scale for site"):
        cc = saelab.create({"architecture": "relu", "d_in": 32, "d_sae": 8, "site": ["base", "ft"]})
        both = build_source({"type": "diff_world", "world": WORLD, "batch_size": 64})
        train(cc, both, {"steps": 2, **FAST}, warm_start=WarmStart({"base": 1.0}))
    with pytest.raises(ConfigError, match="pass the SAE itself"):
        train({"architecture": "relu", "d_in": 16, "d_sae": 8}, data, {"steps": 2}, warm_start=WarmStart(1.0))
    # a checkpoint of a fresh run is not resumed as a warm start
    train(copy.deepcopy(r.sae), data, {"steps": 4, **FAST}, out_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="warm_start"):
        train(copy.deepcopy(r.sae), data, {"steps": 8, **FAST}, tmp_path / "run", warm_start=WarmStart(1.0))


# ---------------------------------------------------------------------------- the stages on a toy
WORLD8 = {**WORLD, "n_ft_only": 8}


def _feature_latents(result: StagesResult, stage: str, truth, categories: list[str]) -> list[int]:
    """For each true feature of `categories`, the alive latent of `stage` whose decoder row points
    most along what the fine-tuned model writes for it."""
    from saelab.evals.core import unit_rows

    sims = unit_rows(truth.parts["ft"]) @ unit_rows(result.saes[stage].W_dec.detach()).t()
    sims[:, ~result.alive(stage)] = -2.0
    return [int(sims[i].argmax()) for i, c in enumerate(truth.categories) if c in categories]


def test_on_the_diff_world_changed_features_rotate_beyond_the_control_and_shared_ones_do_not():
    """Fine-tune-only features appear only with the fine-tuned model and its data, so the latent
    that writes one in F_via_D was something else in D: it must rotate on D->F_via_D. Measured
    (seeds 0-2, these sizes): the latents of 5, 7 and 7 of the 8 fine-tune-only features lie
    below the control's null (cosine ~0.93-0.95), and of 0 of the 16 shared features, while about
    1.6% of the control's own latents do (its 1% quantile). Bounds per seed: at least half of the
    fine-tune-only features' latents, at most 2 of the 16 shared ones; chance (any latent) is a few %."""
    from saelab.diffing.world import DiffWorld

    truth = DiffWorld(WORLD8)
    for seed in (0, 1):
        r = train_stages(
            {"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 4}, world_sources(seed, WORLD8),
            steps=200, stage_steps=100, train=FAST, seed=seed,
        )  # fmt: skip
        assert set(r.saes) == {"S", "D", "M", "F_via_D", "F_via_M", "control"}
        null = r.null("decoder")
        assert 0 < null < 1
        control = r.cosines("S", "control")["decoder"][r.alive("control")]
        assert float((control < null).float().mean()) <= 0.05  # the quantile, give or take ties
        cos = r.cosines("D", "F_via_D")["decoder"]
        ft_only = _feature_latents(r, "F_via_D", truth, ["ft_only"])
        shared = _feature_latents(r, "F_via_D", truth, ["shared"])
        assert int((cos[ft_only] < null).sum()) >= 4, cos[ft_only]
        assert int((cos[shared] < null).sum()) <= 2, cos[shared]
        ranked = r.ranked("D->F_via_D", top=None)
        assert {row["latent"] for row in ranked} == {j for j in range(64) if r.alive("F_via_D")[j] and cos[j] < null}
        assert all(row["decoder"] < null and row["beyond_null"] > 0 for row in ranked)
        assert [row["decoder"] for row in ranked] == sorted(row["decoder"] for row in ranked)
    d = r.as_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    assert set(d["transitions"]) == set(TRANSITIONS)


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_named_before_any_training(monkeypatch):
    import importlib

    trainer = importlib.import_module("saelab.train.trainer")

    calls = []
    monkeypatch.setattr(trainer, "train", lambda *a, **k: calls.append(1))
    cfg = {"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 4}
    sources = world_sources()
    cases = [
        ({k: v for k, v in sources.items() if k != "ft/base"}, {}, r"sources: missing \['ft/base'\]"),
        (sources | {"ft/ft": {**sources["ft/ft"], "world": {**WORLD, "d": 8}}}, {}, r"sources\['ft/ft'\].*d_in"),
        (sources | {"base/ft": []}, {}, r"sources\['base/ft'\]"),
        (sources | {"ft/ft": [torch.zeros(0, 16)]}, {}, r"sources\['ft/ft'\].*empty"),
        (sources, {"train": {"steps": 5}}, r"train\.steps"),
        (sources, {"stage_steps": 0}, "stage_steps"),
    ]
    for srcs, extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            train_stages(cfg, srcs, steps=5, **({"train": FAST} | extra))
    with pytest.raises(ConfigError, match="text list is empty"):
        from saelab.diffing.stages import model_sources

        model_sources({"base": "a", "ft": "b"}, {"base": ["x y"], "ft": []}, "model.layers.1")
    assert not calls


# ---------------------------------------------------------------------------- the CLI
def test_stages_cli_writes_its_files(tmp_path, capsys):
    import yaml

    from saelab.cli import main

    config = {
        "sae": {"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 4},
        "train": {"progress": False, "lr": 3e-3},
        "steps": 60,
        "stage_steps": 30,
        "contexts": 3,
        "sources": world_sources(batch_size=128),
    }
    (tmp_path / "stages.yaml").write_text(yaml.safe_dump(config))
    assert main(["diff", "stages", str(tmp_path / "stages.yaml"), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    from saelab.diffing.stages_report import plot_names

    for name in ("results.json", "report.md", "report.html", *plot_names()):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["stage_steps"] == 30 and set(res["summary"]) == set(TRANSITIONS)
    assert (out / "stages" / "F_via_D" / "sae").is_dir()
    for latents in res["contexts"].values():  # rows of toy sources: indices and values
        assert all(c["row"] >= 0 and c["value"] > 0 for cs in latents.values() for c in cs)
    assert "S->M" in capsys.readouterr().out
    # errors: a crosscoder option with stages, an unknown kind, a bad config key
    assert main(["diff", "stages", str(tmp_path / "stages.yaml"), "--out", str(out), "--batches", "2"]) == 2
    assert "--batches" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "stagez": 1}))
    assert main(["diff", "stages", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o2")]) == 2
    assert "stagez" in capsys.readouterr().err
