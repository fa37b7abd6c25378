"""Run logging beside metrics.jsonl: TensorBoard event files and W&B offline, with the same records."""

import json

import pytest

import saelab
from saelab.errors import ConfigError
from saelab.train.sinks import scalars
from tests.conftest import small_config
from tests.train.test_trainer import FAST, toy_source


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_flatten_to_named_scalars():
    record = {"step": 10, "losses": {"mse": 2.0, "l1": 0.5}, "l0": 3.0, "fvu": 0.1, "tokens": 640}
    assert scalars(record) == {"losses/mse": 2.0, "losses/l1": 0.5, "l0": 3.0, "fvu": 0.1, "tokens": 640.0}


def test_tensorboard_gets_every_logged_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    saelab.train(small_config("topk", d_in=16, d_sae=32), toy_source(), {**FAST, "log_to": ["tensorboard"]}, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    log = jsonl(tmp_path / "metrics.jsonl")
    l0 = events.Scalars("l0")
    assert [e.step for e in l0] == [r["step"] for r in log] == [10, 20, 30, 40]
    assert [e.value for e in l0] == pytest.approx([r["l0"] for r in log])
    assert [e.value for e in events.Scalars("losses/mse")] == pytest.approx([r["losses"]["mse"] for r in log])


def test_wandb_runs_offline_with_the_config_and_every_record(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setattr(wandb, "init", init)
    saelab.train(small_config("relu", d_in=16, d_sae=32), toy_source(), {**FAST, "log_to": ["wandb"]}, tmp_path)
    assert calls["init"]["mode"] == "offline" and calls["init"]["dir"] == str(tmp_path)
    assert calls["init"]["config"]["sae"]["architecture"] == "relu" and calls["finished"]
    log = jsonl(tmp_path / "metrics.jsonl")
    assert [s for s, _ in calls["log"]] == [r["step"] for r in log]
    assert [v["fvu"] for _, v in calls["log"]] == pytest.approx([r["fvu"] for r in log])


@pytest.mark.slow
def test_a_real_offline_wandb_run_writes_its_folder(tmp_path):
    pytest.importorskip("wandb")
    saelab.train(small_config("relu", d_in=16, d_sae=32), toy_source(), {**FAST, "log_to": ["wandb"]}, tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_extra_sinks_need_a_run_folder():
    with pytest.raises(ConfigError, match="give an out folder"):
        saelab.train(small_config("relu", d_in=16, d_sae=32), toy_source(), {**FAST, "log_to": ["tensorboard"]})
