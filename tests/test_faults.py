"""Fault injection: kill -9 at random points of training, checkpointing and the final save, a full
disk at every kind of write, and a second kill during the rerun. After each, running again must
end with exactly the weights of an uninterrupted run. Bounded: a few seeded points per kind."""

import multiprocessing
import os
import random
import signal

import pytest
import torch

import saelab
from saelab.errors import WriteError
from saelab.train import Trainer
from saelab.train import checkpoint as ckpt
from tests.conftest import small_config
from tests.train.test_trainer import FAST, toy_source

pytestmark = pytest.mark.slow

SAE = small_config("jumprelu", d_in=16, d_sae=48)
TRAIN = {**FAST, "steps": 30, "checkpoint_every": 7, "log_every": 5}
RUN = {
    "sae": {"architecture": "topk", "d_in": 12, "d_sae": 24, "k": 3},
    "train": {"steps": 20, "progress": False, "norm_estimation_batches": 2, "log_every": 5, "checkpoint_every": 6},
    "source": {"type": "world", "world": {"n_features": 32, "d": 12, "firing_prob": 0.08}, "batch_size": 32},
}
POINTS = random.Random(16).sample(range(1, 30), 3)  # steps at which a kill lands, fixed so failures reproduce


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _in_child(target, *args) -> int:
    """Run target(*args) in a forked child that is expected to kill itself; its exit code."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    proc.join(120)
    assert not proc.is_alive(), "the child did not die"
    return proc.exitcode


def _train(out):
    return Trainer(saelab.create(SAE), toy_source(), TRAIN, out).fit()


def _kill_at_step(out, step):
    from saelab.toys.features import ToySource

    original = ToySource.__next__

    def dying(self):
        if self.position == step:
            _die()
        return original(self)

    ToySource.__next__ = dying
    _train(out)


def _kill_mid_checkpoint(out, nth, stage):
    """Die inside the nth checkpoint write: half-way through the tensors file, or after the
    folder is complete but before the `latest` pointer."""
    calls = [0]
    if stage == "tensors":
        real = ckpt.write_safetensors

        def dying(path, tensors, metadata=None):
            calls[0] += 1
            if calls[0] == nth:
                path.write_bytes(b"\0" * 1000)  # a part-written temp file
                _die()
            return real(path, tensors, metadata)

        ckpt.write_safetensors = dying
    else:
        real = ckpt.write_text

        def dying(path, text):
            calls[0] += 1
            if calls[0] == nth:
                _die()
            return real(path, text)

        ckpt.write_text = dying
    _train(out)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("straight")).sae


def _assert_same(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs from the uninterrupted run"


@pytest.mark.parametrize("step", POINTS)
def test_kill_9_during_training_then_rerun_matches(step, straight, tmp_path):
    assert _in_child(_kill_at_step, tmp_path, step) == -signal.SIGKILL
    _assert_same(straight, _train(tmp_path).sae)


@pytest.mark.parametrize("nth, stage", [(2, "tensors"), (3, "pointer"), (5, "tensors")])
def test_kill_9_during_a_checkpoint_write_then_rerun_matches(nth, stage, straight, tmp_path):
    assert _in_child(_kill_mid_checkpoint, tmp_path, nth, stage) == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    assert any(p.name.startswith(".step_") for p in root.iterdir()) == (stage == "tensors")  # the debris
    _assert_same(straight, _train(tmp_path).sae)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # cleaned on the rerun


def test_a_kill_during_the_rerun_too_still_ends_the_same(straight, tmp_path):
    first, second = sorted(POINTS[:2])
    assert _in_child(_kill_at_step, tmp_path, first) == -signal.SIGKILL
    assert _in_child(_kill_at_step, tmp_path, second + 3) == -signal.SIGKILL
    _assert_same(straight, _train(tmp_path).sae)


def _kill_in_final_save(out):
    from saelab.io import saelens

    real = saelens.write_json

    def dying(path, obj):
        if path.name == "cfg.json":
            _die()
        return real(path, obj)

    saelens.write_json = dying
    saelab.run(RUN, out)


def test_kill_9_during_the_final_save_then_rerun_matches(tmp_path):
    straight = saelab.run(RUN, tmp_path / "a")
    assert _in_child(_kill_in_final_save, tmp_path / "b") == -signal.SIGKILL
    rerun = saelab.run(RUN, tmp_path / "b")
    assert rerun[0]["train_steps"] == straight[0]["train_steps"] == 20
    _assert_same(saelab.load(tmp_path / "a" / "sae"), saelab.load(tmp_path / "b" / "sae"))


@pytest.mark.parametrize("nth", [1, 3, 6])
def test_a_full_disk_at_any_write_fails_cleanly_and_the_rerun_matches(nth, straight, tmp_path, monkeypatch):
    """The nth atomic write (a log rewrite, a checkpoint's tensors or state, the pointer) hits ENOSPC."""
    import saelab.io.atomic as atomic

    real = atomic.os.replace
    calls = [0]

    def full(src, dst):
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(WriteError, match="No space left on device"):
        _train(tmp_path)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not list(tmp_path.rglob(".*.tmp"))  # the failed write left nothing behind
    _assert_same(straight, _train(tmp_path).sae)
