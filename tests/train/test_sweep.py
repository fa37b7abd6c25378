"""Sweeps: each member trains exactly as it would alone, resumes exactly, and bad input is named."""

import json

import pytest
import torch
import yaml

import saelab
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.toys import ToySource, World
from saelab.train import Trainer, train_many
from saelab.train import checkpoint as ckpt
from saelab.train.trainer import Member
from tests.conftest import small_config
from tests.train.test_trainer import FAST, WORLD, KilledSource, toy_source


def assert_same_weights(a, b, name):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name}: {key} differs"


def members():
    """Every architecture, plus two that draw from torch's global RNG at every step (so a shared
    stream would change both) and per-member widths, seeds and learning rates."""
    saes = {arch: small_config(arch, d_in=16, d_sae=48) for arch in saelab.list_architectures(one_stream=True)}
    saes["matryoshka_random"] = small_config("matryoshka", d_in=16, d_sae=32, random_prefixes=True)
    saes["matryoshka_random3"] = {
        **small_config("matryoshka", d_in=16, d_sae=40, random_prefixes=True, n_random_prefixes=3),
        "train": {"seed": 5, "lr": 3e-3},
    }
    return saes


def test_each_member_trains_exactly_as_it_would_alone():
    saes = members()
    swept = train_many(saes, toy_source(), FAST)
    assert list(swept) == list(saes)
    for name, cfg in saes.items():
        sae_cfg = {k: v for k, v in cfg.items() if k != "train"}
        alone = saelab.train(sae_cfg, toy_source(), {**FAST, **cfg.get("train", {})})
        assert swept[name].input_scale == alone.input_scale and swept[name].tokens == alone.tokens
        assert_same_weights(alone.sae, swept[name].sae, name)
        assert [r["loss"] for r in swept[name].history] == [r["loss"] for r in alone.history]


@pytest.mark.parametrize("kill", ["mid-stream", "between members' checkpoints"])
def test_killed_sweep_resumes_to_the_same_weights(kill, tmp_path, monkeypatch):
    saes = {
        name: small_config(arch, d_in=16, d_sae=48, **extra)
        for name, arch, extra in [
            ("relu", "relu", {}),
            ("batchtopk", "batchtopk", {}),
            ("jumprelu", "jumprelu", {}),
            ("matryoshka", "matryoshka", {"random_prefixes": True}),
        ]
    }
    cfg = {**FAST, "checkpoint_every": 10, "keep_checkpoints": 1}
    straight = train_many(saes, toy_source(), cfg, tmp_path / "a")

    if kill == "mid-stream":  # norm estimation reads 2 batches and rewinds, so batch 27 is step 27
        with pytest.raises(KeyboardInterrupt):
            train_many(saes, KilledSource(kill_at=27), cfg, tmp_path / "b")
    else:  # at step 30 the first member has saved, the second dies before it does
        save = Member.save_checkpoint

        def dying(self, source):
            if self.step == 30 and self.out_dir.name == "batchtopk":
                raise KeyboardInterrupt("killed")
            return save(self, source)

        monkeypatch.setattr(Member, "save_checkpoint", dying)
        with pytest.raises(KeyboardInterrupt):
            train_many(saes, toy_source(), cfg, tmp_path / "b")
        monkeypatch.setattr(Member, "save_checkpoint", save)
        # relu saved step 30 and kept step 20 (pruning waits for every member): 20 is the common step
        assert ckpt.complete_steps(tmp_path / "b" / "relu") == [20, 30]
        assert ckpt.complete_steps(tmp_path / "b" / "batchtopk") == [20]
    resumed = train_many(saes, toy_source(), cfg, tmp_path / "b")  # fresh objects, state only from disk
    for name in saes:
        assert resumed[name].steps == 40
        assert_same_weights(straight[name].sae, resumed[name].sae, name)
        log = [json.loads(line)["step"] for line in (tmp_path / "b" / name / "metrics.jsonl").read_text().splitlines()]
        assert log == [10, 20, 30, 40]
        assert [p.name for p in (tmp_path / "b" / name / "checkpoints").glob("step_*")] == ["step_000000040"]

    # every member checkpoint holds the source position, so a member's folder resumes on its own
    alone = Trainer(saelab.create(saes["relu"]), toy_source(), cfg, tmp_path / "b" / "relu").fit()
    assert alone.steps == 40
    assert_same_weights(straight["relu"].sae, alone.sae, "relu")
    with pytest.raises(ConfigError, match="holds a sweep of"):
        train_many({"relu": saes["relu"]}, toy_source(), cfg, tmp_path / "b")


def test_train_command_trains_an_saes_list_as_one_sweep(tmp_path):
    cfg = {
        "saes": [
            {"architecture": "topk", "d_in": 16, "d_sae": 48, "k": 3, "name": "k3"},
            {"architecture": "topk", "d_in": 16, "d_sae": 48, "k": 6, "name": "k6"},
            {"architecture": "relu", "d_in": 16, "d_sae": 32, "train": {"lr": 3e-3}},
        ],
        "train": FAST,
        "source": {"type": "toy", "world": WORLD, "batch_size": 64},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 0
    records = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["name"], r["architecture"]) for r in records] == [("k3", "topk"), ("k6", "topk"), ("02_relu", "relu")]
    assert records[0]["l0"] <= 3 + 1e-6 < records[1]["l0"] <= 6 + 1e-6
    assert {r["train_steps"] for r in records} == {40}
    alone = saelab.train(
        {"architecture": "relu", "d_in": 16, "d_sae": 32}, ToySource(World(WORLD), 64), {**FAST, "lr": 3e-3}
    )
    assert_same_weights(alone.sae, saelab.load(records[2]["path"]), "02_relu")


@pytest.mark.parametrize(
    "saes, message",
    [
        ([], "non-empty list"),
        ([small_config("relu", d_in=16), small_config("relu", d_in=12)], r"d_in differ \(00_relu: 16, 01_relu: 12\)"),
        (
            [{**small_config("relu", d_in=16), "name": "a"}, {**small_config("topk", d_in=16), "name": "a"}],
            r"saes\[1\]: the name 'a' is already used by saes\[0\]",
        ),
        ([{**small_config("relu", d_in=16), "name": "../up"}], "plain folder name"),
        ([{**small_config("relu", d_in=16), "train": {"steps": 10}}], r"\['steps'\] cannot differ"),
        ([{**small_config("relu", d_in=16), "train": {"lr_warmup": 10}}], r"saes\[0\]: train: unknown key 'lr_warmup'"),
        ([{"architecture": "relu", "d_in": 16, "d_sea": 32}], r"saes\[0\]: .*unknown key 'd_sea'"),
        (["relu"], r"saes\[0\] must be an SAE or a config mapping"),
    ],
)
def test_bad_sweeps_are_refused_with_the_problem_named(saes, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(saes, toy_source(), FAST)


def test_one_sae_object_cannot_be_two_members():
    sae = saelab.create(small_config("relu", d_in=16))
    with pytest.raises(ConfigError, match="same SAE object"):
        Trainer({"a": sae, "b": sae}, toy_source(), FAST)


def test_train_config_needs_sae_or_saes_not_both(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"sae": small_config("relu"), "saes": [small_config("relu")]}))
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "either an `sae` mapping or an `saes` list" in capsys.readouterr().err
