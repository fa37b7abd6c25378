"""Nothing silently wrong, nothing lost: each case a careful user or a hostile environment found."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import saelab
from saelab.cli import main
from saelab.errors import (
    ConfigError,
    FileFormatError,
    FolderInUseError,
    SaelabWarning,
    TrainingInterrupted,
    WriteError,
)
from saelab.toys import ToySource, World
from saelab.train import Trainer, train_many
from saelab.train import checkpoint as ckpt
from tests.conftest import small_config
from tests.train.test_trainer import FAST, WORLD, KilledSource, toy_source

RUN_WORLD = {"n_features": 32, "d": 12, "firing_prob": 0.08}
RUN_SAE = {"architecture": "topk", "d_in": 12, "d_sae": 24, "k": 3}
RUN_TRAIN = {"steps": 20, "progress": False, "norm_estimation_batches": 2, "log_every": 5, "checkpoint_every": 10}
SRC = Path(__file__).resolve().parents[1] / "src"


def run_config(**source):
    return {
        "sae": dict(RUN_SAE),
        "train": dict(RUN_TRAIN),
        "source": {"type": "world", "world": RUN_WORLD, "batch_size": 32, **source},
    }


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def one_line_error(capsys, command="train") -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"saelab {command}: error:"), err
    return err


# ---------------------------------------------------------------------------- 1. resume checks the data
@pytest.mark.parametrize(
    "change, named",
    [
        ({"source": {"batch_size": 16}}, r"source\.batch_size: 32 -> 16"),
        ({"source": {"world": {**RUN_WORLD, "firing_prob": 0.2}}}, r"source\.world\.firing_prob: 0\.08 -> 0\.2"),
        ({"source": {"seed": 5}}, r"source\.seed: 0 -> 5"),
        ({"eval_source": {"type": "world", "world": RUN_WORLD, "seed": 3}}, r"eval_source\.seed: 7919 -> 3"),
    ],
)
def test_resuming_on_other_data_is_refused_with_the_changed_field_named(change, named, tmp_path):
    cfg = run_config()
    with pytest.raises(KeyboardInterrupt):  # stop after the step-10 checkpoint: a run to resume
        _interrupt_after(cfg, tmp_path, step=12)
    changed = run_config(**{k: v for k, v in change.get("source", {}).items()})
    if "eval_source" in change:
        changed["eval_source"] = change["eval_source"]
    with pytest.raises(ConfigError, match=r"different data source config \(.*" + named):
        saelab.run(changed, tmp_path)
    assert saelab.run(cfg, tmp_path)[0]["train_steps"] == 20  # the original data still resumes


def _interrupt_after(cfg, out, step):
    """Run `cfg` and die (KeyboardInterrupt, no checkpoint) when training asks for batch `step`."""
    from saelab.toys.features import ToySource as Toy

    original = Toy.__next__

    def dying(self):
        if self.position >= step:
            raise KeyboardInterrupt("killed")
        return original(self)

    Toy.__next__ = dying
    try:
        saelab.run(cfg, out)
    finally:
        Toy.__next__ = original


# ---------------------------------------------------------------------------- 2. one writer per folder
HOLD = """
import sys, time
sys.path.insert(0, {src!r})
from saelab.io.lock import run_lock
with run_lock({out!r}):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(src=str(SRC), out=str(out))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holder_named_and_a_killed_holder_frees_the_folder(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by another saelab run \(pid {holder.pid} on "):
            saelab.run(run_config(), tmp_path)
        with pytest.raises(FolderInUseError):
            Trainer(saelab.create(small_config("relu", d_in=16)), toy_source(), FAST, tmp_path).fit()
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    assert saelab.run(run_config(), tmp_path)[0]["train_steps"] == 20


def test_the_cli_refuses_a_second_writer_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config()))
    holder = _holder(tmp_path / "out")
    try:
        assert main(["train", str(path), "--out", str(tmp_path / "out")]) == 2
        assert f"pid {holder.pid}" in one_line_error(capsys)
    finally:
        holder.stdin.close()
        holder.wait()


# ---------------------------------------------------------------------------- 3. Ctrl-C and SIGTERM
class SignalledSource(ToySource):
    """Sends this process `signum` when training asks for batch `at` (once)."""

    def __init__(self, at, signum):
        super().__init__(World(WORLD), batch_size=64)
        self.at, self.signum, self.sent = at, signum, False

    def __next__(self):
        if self.position == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return super().__next__()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_writes_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run(signum, tmp_path):
    cfg = small_config("topk", d_in=16, d_sae=48)
    straight = Trainer(saelab.create(cfg), toy_source(), FAST).fit()  # checkpoint_every 0: only at the end
    with pytest.raises(TrainingInterrupted, match=rf"stopped by {signal.Signals(signum).name} at step 13 of 40"):
        Trainer(saelab.create(cfg), SignalledSource(at=12, signum=signum), FAST, tmp_path).fit()
    assert ckpt.complete_steps(tmp_path) == [13]
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers put back
    resumed = Trainer(saelab.create(cfg), toy_source(), FAST, tmp_path).fit()
    assert resumed.steps == 40 and same_weights(straight.sae, resumed.sae)


@pytest.mark.slow
def test_the_cli_exits_130_on_ctrl_c_with_how_to_resume(tmp_path):
    cfg = run_config()
    cfg["train"] = {**RUN_TRAIN, "steps": 10_000_000, "checkpoint_every": 0, "log_every": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saelab.cli", "train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "metrics.jsonl").is_file() or not (tmp_path / "out" / "metrics.jsonl").stat().st_size:
        assert time.monotonic() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("saelab train: stopped by SIGINT at step ") and "run the same command again" in line
    assert len(ckpt.complete_steps(tmp_path / "out")) == 1


# ---------------------------------------------------------------------------- 4. damaged checkpoints
def _flip(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated tensors": lambda p: (p / "tensors.safetensors").write_bytes(
        (p / "tensors.safetensors").read_bytes()[:-50]
    ),
    "missing tensors": lambda p: (p / "tensors.safetensors").unlink(),
    "bit-flipped tensors": lambda p: _flip(p / "tensors.safetensors"),
    "bit-flipped state": lambda p: _flip(p / "state.json", 40),
    "hand-edited state": lambda p: (p / "state.json").write_text(
        (p / "state.json").read_text().replace('"step": 40', '"step": 39')
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_with_a_warning_and_the_previous_one_resumes_exactly(damage, tmp_path):
    cfg = small_config("relu", d_in=16, d_sae=48)
    train = {**FAST, "checkpoint_every": 20}
    straight = Trainer(saelab.create(cfg), toy_source(), train, tmp_path).fit()
    assert ckpt.complete_steps(tmp_path) == [20, 40]
    DAMAGE[damage](ckpt.step_path(tmp_path, 40))
    with pytest.warns(SaelabWarning, match=r"step_000000040 is damaged .*moved to damaged_step_000000040"):
        resumed = Trainer(saelab.create(cfg), toy_source(), train, tmp_path).fit()
    assert resumed.steps == 40 and same_weights(straight.sae, resumed.sae)
    assert ckpt.complete_steps(tmp_path) == [20, 40] and ckpt.verify(ckpt.step_path(tmp_path, 40)) is None


def test_a_damaged_member_checkpoint_falls_back_to_the_previous_common_step(tmp_path):
    saes = {"relu": small_config("relu", d_in=16, d_sae=48), "topk": small_config("topk", d_in=16, d_sae=48)}
    train = {**FAST, "checkpoint_every": 20}
    straight = train_many(saes, toy_source(), train, tmp_path)
    DAMAGE["truncated tensors"](ckpt.step_path(tmp_path / "topk", 40))
    with pytest.warns(SaelabWarning, match=r"topk.*step_000000040 is damaged"):
        resumed = train_many(saes, toy_source(), train, tmp_path)
    for name in saes:
        assert same_weights(straight[name].sae, resumed[name].sae), name


def test_stale_temp_folders_of_a_killed_checkpoint_write_are_removed(tmp_path):
    cfg = small_config("relu", d_in=16, d_sae=48)
    Trainer(saelab.create(cfg), toy_source(), {**FAST, "steps": 20}, tmp_path).fit()
    root = tmp_path / "checkpoints"
    (root / ".step_000000030.abc").mkdir()
    (root / ".step_000000030.abc" / "tensors.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".metrics.jsonl.xyz.tmp").write_text("half")
    os.replace(root / "step_000000020", root / ".old_step_000000020")  # killed mid-rewrite of step 20
    result = Trainer(saelab.create(cfg), toy_source(), {**FAST, "steps": 20}, tmp_path).fit()
    assert result.steps == 20  # the moved-aside checkpoint was put back and resumed from
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000020"]
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------- 5. a bad log line
def test_records_after_a_malformed_line_survive_a_resume(tmp_path):
    cfg = small_config("relu", d_in=16, d_sae=48)
    train = {**FAST, "log_every": 5, "checkpoint_every": 20}
    with pytest.raises(KeyboardInterrupt):
        Trainer(saelab.create(cfg), KilledSource(kill_at=27), train, tmp_path).fit()
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5, 10, 15, 20, 25]
    log.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.warns(SaelabWarning, match="skipped 1 unreadable line"):
        Trainer(saelab.create(cfg), toy_source(), train, tmp_path).fit()
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [5, 15, 20, 25, 30, 35, 40]


# ---------------------------------------------------------------------------- 6. one-shot iterators
def test_a_one_shot_iterator_is_refused_and_a_function_returning_one_trains_exactly(tmp_path):
    data = [b.x for b, _ in zip(toy_source(), range(60))]
    cfg = small_config("topk", d_in=16, d_sae=48)
    for one_shot in (iter(data), (x for x in data)):
        with pytest.raises(ConfigError, match=r"one-shot iterator .* pass a list, or a function returning"):
            saelab.train(cfg, one_shot, FAST)
    from_list = saelab.train(cfg, data, FAST)
    from_function = saelab.train(cfg, lambda: iter(data), FAST)
    assert same_weights(from_list.sae, from_function.sae)
    with pytest.raises(ConfigError, match="returned the same iterator again"):
        shared = iter(data)
        saelab.train(cfg, lambda: shared, FAST)


# ---------------------------------------------------------------------------- 7. no silent architecture
def test_a_cfg_json_without_architecture_is_not_loaded_as_another(tmp_path):
    sae = saelab.create(small_config("topk", d_in=12, d_sae=24))
    saelab.save(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["architecture"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match=r"no 'architecture' \(saelab's metadata says it was trained as 'topk'\)"):
        saelab.load(tmp_path)


# ---------------------------------------------------------------------------- 8. one run per folder
def test_a_single_run_and_a_sweep_cannot_share_a_folder(tmp_path):
    sweep = {**run_config(), "saes": [dict(RUN_SAE), {**RUN_SAE, "k": 2}]}
    del sweep["sae"]
    saelab.run(run_config(), tmp_path / "single")
    with pytest.raises(ConfigError, match="holds a single-SAE run"):
        saelab.run(sweep, tmp_path / "single")
    saelab.run(sweep, tmp_path / "sweep")
    with pytest.raises(ConfigError, match="holds a sweep of"):
        saelab.run(run_config(), tmp_path / "sweep")


# ---------------------------------------------------------------------------- one clear line
def _train_cli(tmp_path, cfg, out) -> int:
    path = tmp_path / "run.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return main(["train", str(path), "--out", str(out)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    cfg = run_config()
    cfg["train"]["device"] = "cuda"
    assert _train_cli(tmp_path, cfg, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert "'device'" in err and "no usable CUDA" in err


def test_an_out_path_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _train_cli(tmp_path, run_config(), tmp_path / "file") == 2
    assert "exists and is not a folder" in one_line_error(capsys)
    assert _train_cli(tmp_path, run_config(), tmp_path / "file" / "sub") == 2
    assert "under a file" in one_line_error(capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_a_read_only_out_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert _train_cli(tmp_path, run_config(), out) == 2
        assert str(out) in one_line_error(capsys)
    finally:
        out.chmod(0o755)


def test_a_duplicated_yaml_key_is_an_error_not_the_last_one_silently(tmp_path, capsys):
    text = yaml.safe_dump(run_config()) + "train: {steps: 5}\n"
    assert _train_cli(tmp_path, text, tmp_path / "out") == 2
    assert "the key 'train' appears twice" in one_line_error(capsys)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import saelab.io.atomic as atomic

    real = atomic.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 20)
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", full_disk)
    assert _train_cli(tmp_path, run_config(), tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert "cannot write checkpoint" in err and "No space left on device" in err and "step_000000020" in err
    assert ckpt.complete_steps(tmp_path / "out") == [10]
    assert not [p for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(atomic, "save_file", real)
    assert _train_cli(tmp_path, run_config(), tmp_path / "out") == 0  # resumes from step 10


def test_a_failed_log_append_is_a_write_error(tmp_path, monkeypatch):
    from saelab.train import trainer

    def full(path, line):
        raise WriteError(f"cannot write {path} (No space left on device)")

    monkeypatch.setattr(trainer, "append_line", full)
    with pytest.raises(WriteError, match="metrics.jsonl"):
        Trainer(saelab.create(small_config("relu", d_in=16, d_sae=48)), toy_source(), FAST, tmp_path).fit()


def test_nan_weights_are_named_when_loading(tmp_path, capsys):
    sae = saelab.create(small_config("relu", d_in=12, d_sae=24))
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    saelab.save(sae, tmp_path / "sae")
    assert main(["eval", str(tmp_path / "sae")]) == 2
    assert "'W_enc' contains NaN or Inf" in one_line_error(capsys, "eval")


def test_a_wrong_width_eval_source_is_found_before_training(tmp_path):
    cfg = {**run_config(), "eval_source": {"type": "world", "world": {**RUN_WORLD, "d": 10}}}
    with pytest.raises(ConfigError, match="eval_source yields d_in=10"):
        saelab.run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_output_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        saelab.run(run_config(), tmp_path)
    finally:
        os.umask(old)
    for path in [
        tmp_path / "sae" / "cfg.json",
        tmp_path / "metrics.jsonl",
        ckpt.step_path(tmp_path, 20) / "state.json",
    ]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert ckpt.step_path(tmp_path, 20).stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "SAE", "--latents", "3,abc", "--out", "OUT"], r"--latents: 'abc' is not a latent id"),
        (["steer", "SAE", "--latent", "0", "--scale", "1", "--prompt", ""], r"--prompt is empty"),
        (["steer", "SAE", "--latent", "0", "--scale", "1", "--max-new-tokens", "-1"], r"--max-new-tokens must be"),
    ],
)
def test_bad_model_command_arguments_are_one_line_before_any_model_loads(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("SAE", "OUT") else a for a in argv]
    assert main(argv) == 2
    assert __import__("re").search(message, one_line_error(capsys, argv[0]))


@pytest.mark.parametrize(
    "every, note", [(0, "no checkpoint was written yet"), (10, "the newest checkpoint is step 20 in")]
)
def test_a_nan_stop_says_truthfully_what_checkpoint_is_left(every, note, tmp_path):
    class Poisoned(ToySource):
        def __next__(self):
            b = super().__next__()
            if self.position == 25:
                b.x[0, 0] = float("nan")
            return b

    trainer = Trainer(
        saelab.create(small_config("relu", d_in=16)),
        Poisoned(World(WORLD), 64),
        {**FAST, "checkpoint_every": every},
        tmp_path,
    )
    with pytest.raises(saelab.errors.NonFiniteError, match=note):
        trainer.fit()


def _spawned_workers() -> set[int]:
    """Pids of live multiprocessing spawn workers (their command line runs `spawn_main`)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"spawn_main" in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads worker processes from /proc")
def test_a_terminated_parent_takes_its_parallel_workers_with_it():
    """`saelab demo` and `saelab bench` run jobs in a process pool; SIGTERM to the command must not
    leave workers training on after it."""
    before = _spawned_workers()
    script = "import time\nfrom saelab.parallel import run_jobs\nrun_jobs(time.sleep, [120, 120], 2, print)\n"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while len(_spawned_workers() - before) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "the workers never started"
        time.sleep(0.2)
    workers = _spawned_workers() - before
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 15
    while workers & _spawned_workers():
        assert time.monotonic() < deadline, f"workers {sorted(workers & _spawned_workers())} outlived their parent"
        time.sleep(0.2)
