"""Data-parallel training: two CPU processes over gloo train exactly what one process trains on
the combined batch, agree on latent statistics, resume exactly, and fail fast when a rank fails."""

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import saelab
from saelab.activations.base import Batch, IteratorSource
from saelab.errors import ConfigError
from saelab.toys import ToySource, World
from saelab.train import Trainer
from saelab.train.distributed import RowShard
from saelab.train.trainer import Member
from tests.conftest import small_config

WORLD = {"n_features": 16, "d": 16, "firing_prob": 0.05, "magnitude_std": 0.2}  # orthonormal: instant to build
BATCH = 64  # the global batch; each of the 2 ranks trains on 32 rows of it
TRAIN = {
    "steps": 20,
    "progress": False,
    "lr": 3e-3,
    "lr_warmup_steps": 2,
    "sparsity_warmup_steps": 5,
    "norm_estimation_batches": 2,
    "log_every": 10,
    "dead_after_tokens": 64,
    "checkpoint_every": 10,
}
ARCHS = ("relu", "topk")
ROOT = Path(__file__).resolve().parents[2]


def sae_config(arch: str) -> dict:
    return small_config(arch, d_in=16, d_sae=48)


@functools.cache
def toy_world() -> World:
    return World(WORLD)


def toy_source() -> ToySource:
    return ToySource(toy_world(), batch_size=BATCH, seed=3)


def plain_batches() -> list[torch.Tensor]:
    """A source saelab did not generate (no `shard`): each rank takes its half of every batch."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(BATCH, 16, generator=gen) * 3 + 1 for _ in range(40)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- worker side
class _Stop(Exception):
    pass


@contextlib.contextmanager
def _patched_step(check):
    """Run `check(member)` before every training step of every member (in this worker only)."""
    original = Member.train_step

    def step(self, x, batch=None, target=None):
        check(self)
        return original(self, x, batch, target)

    Member.train_step = step
    try:
        yield
    finally:
        Member.train_step = original


def _stop_at_13(member):
    """Stops every rank at the same step, after the step-10 checkpoint, as a killed job would."""
    if member.step == 13:
        raise _Stop


def _fail_on_rank_1(member):
    if member.dist.rank == 1 and member.step == 5:
        raise RuntimeError("injected failure on rank 1")


def _save_rank(path: Path, trainer: Trainer, result) -> None:
    tensors = {f"sae.{k}": v.contiguous() for k, v in result.sae.state_dict().items()}
    tensors.update({f"stats.{k}": v for k, v in result.latent_stats.state_dict().items()})
    tensors.update({f"source.{k}": v for k, v in trainer.source.state_dict().items()})
    tensors["input_scale"] = torch.tensor(result.input_scale)
    tensors["tokens"] = torch.tensor(result.tokens)
    save_file(tensors, str(path))


def _job_train(rank: int, out: Path) -> None:
    for arch in ARCHS:
        trainer = Trainer(saelab.create(sae_config(arch)), toy_source(), TRAIN, out / arch)
        _save_rank(out / f"{arch}_rank{rank}.safetensors", trainer, trainer.fit())

        with pytest.raises(_Stop), _patched_step(_stop_at_13):
            Trainer(saelab.create(sae_config(arch)), toy_source(), TRAIN, out / f"{arch}_resume").fit()
        trainer = Trainer(saelab.create(sae_config(arch)), toy_source(), TRAIN, out / f"{arch}_resume")
        _save_rank(out / f"{arch}_resumed_rank{rank}.safetensors", trainer, trainer.fit())

    cfg = {**TRAIN, "checkpoint_every": 0}
    trainer = Trainer(saelab.create(sae_config("relu")), plain_batches(), cfg)
    _save_rank(out / f"plain_rank{rank}.safetensors", trainer, trainer.fit())


def _job_fail(rank: int, out: Path) -> None:
    try:
        with _patched_step(_fail_on_rank_1):
            Trainer(saelab.create(sae_config("relu")), toy_source(), {**TRAIN, "checkpoint_every": 0}).fit()
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank saw
        (out / f"error_rank{rank}.json").write_text(json.dumps({"error": repr(exc), "time": time.time()}))
        if rank == 1:
            time.sleep(60)  # a wedged rank: alive, its connections open, never joining the all-reduce
        raise


def _worker(rank: int, world_size: int, port: int, out: str, job: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    from saelab.train import distributed

    assert distributed.init_from_env("cpu", timeout_s=timeout_s)
    {"train": _job_train, "fail": _job_fail}[job](rank, Path(out))
    distributed.shutdown()


# Forked workers start in milliseconds (torch and saelab already imported, Adam's kernels warm);
# safe here because the parent runs torch single-threaded and never joins a process group.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def start(job: str, out: Path, timeout_s: float):
    return mp.start_processes(
        _worker, args=(2, free_port(), str(out), job, timeout_s), nprocs=2, join=False, start_method=START_METHOD
    )


def run_to_end(job: str, out: Path, timeout_s: float, deadline_s: float) -> None:
    """Run both ranks; re-raise a rank's exception; never wait longer than `deadline_s`."""
    context = start(job, out, timeout_s)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=0.2):
            assert time.monotonic() < deadline, f"the {job} job did not finish within {deadline_s} s"
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


# ---------------------------------------------------------------------------- reference side
def combined_toy_source() -> IteratorSource:
    """One process seeing what both ranks see: each step's batch is rank 0's rows then rank 1's."""

    def batches():
        shards = [toy_source().shard(rank, 2) for rank in range(2)]  # built here, not lazily under no_grad
        return (Batch(x=torch.cat([next(s).x for s in shards])) for _ in iter(int, 1))

    return IteratorSource(batches)


def single_process(arch: str, source) -> tuple[Trainer, object]:
    trainer = Trainer(saelab.create(sae_config(arch)), source, {**TRAIN, "checkpoint_every": 0})
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[Trainer, object]]:
    """Single-process runs on the combined batches (computed before forking, which also warms
    up Adam's kernels for the workers)."""
    runs = {arch: single_process(arch, combined_toy_source()) for arch in ARCHS}
    runs["plain"] = single_process("relu", plain_batches())
    return runs


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, reference):
    out = tmp_path_factory.mktemp("ddp")
    run_to_end("train", out, timeout_s=30, deadline_s=120)
    return out


def ranks(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(out / f"{name}_rank{r}.safetensors")) for r in range(2)]


def sae_state(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[4:]: v for k, v in saved.items() if k.startswith("sae.")}


def assert_close_to(saved: dict[str, torch.Tensor], sae) -> None:
    for name, ref in sae.state_dict().items():
        got = saved[f"sae.{name}"]
        scale = max(float(ref.abs().max()), 1e-3)
        err = float((got - ref).abs().max())
        assert err <= 1e-5 * scale, f"{name}: max difference {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_train_what_one_process_trains_on_the_combined_batch(ddp_run, reference, arch):
    r0, r1 = ranks(ddp_run, arch)
    for key in sae_state(r0):  # DDP keeps the replicas identical, bit for bit
        assert torch.equal(r0[f"sae.{key}"], r1[f"sae.{key}"]), key
    trainer, result = reference[arch]
    assert float(r0["input_scale"]) == pytest.approx(result.input_scale, rel=1e-6)
    assert int(r0["tokens"]) == result.tokens == TRAIN["steps"] * BATCH
    assert_close_to(r0, result.sae)


def test_a_source_without_shard_is_split_by_rows_and_matches_one_process(ddp_run, reference):
    r0, _ = ranks(ddp_run, "plain")
    trainer, result = reference["plain"]
    assert int(r0["source.position"]) == trainer.source.position  # both ranks drew every batch
    assert_close_to(r0, result.sae)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_statistics_are_those_of_the_combined_batch_on_every_rank(ddp_run, reference, arch):
    r0, r1 = ranks(ddp_run, arch)
    stats = reference[arch][1].latent_stats
    expected = stats.state_dict()
    if arch == "topk":  # dead latents exist, so AuxK trained on the shared dead mask
        assert 0 < int(stats.dead_mask().sum()) < 48
    for name, value in expected.items():
        assert torch.equal(r0[f"stats.{name}"], r1[f"stats.{name}"]), name
        assert torch.equal(r0[f"stats.{name}"], value), name


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stopped_two_rank_run_resumes_exactly(ddp_run, arch):
    straight, resumed = ranks(ddp_run, arch), ranks(ddp_run, f"{arch}_resumed")
    for rank in range(2):
        assert straight[rank].keys() == resumed[rank].keys()
        for key, value in straight[rank].items():
            assert torch.equal(value, resumed[rank][key]), f"rank {rank}: {key} differs after resume"
    # each rank resumed its own data stream (toy shards differ between ranks)
    assert not torch.equal(straight[0]["source.generator"], straight[1]["source.generator"])
    steps = [
        json.loads(line)["step"] for line in (ddp_run / f"{arch}_resume" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [10, 20]  # rank 0 alone writes the log


def test_resuming_with_another_number_of_ranks_names_both(ddp_run):
    state = json.loads((ddp_run / "relu" / "checkpoints" / "step_000000020" / "state.json").read_text())
    assert state["world_size"] == 2
    trainer = Trainer(saelab.create(sae_config("relu")), toy_source(), TRAIN, ddp_run / "relu")
    with pytest.raises(ConfigError, match=r"run on 2 process\(es\) but this run has 1"):
        trainer.fit()


def test_a_failed_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    timeout_s = 2.0
    context = start("fail", tmp_path, timeout_s=timeout_s)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "error_rank0.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "error_rank0.json").exists(), "rank 0 still waiting for the failed rank"
        failed = json.loads((tmp_path / "error_rank1.json").read_text())
        survivor = json.loads((tmp_path / "error_rank0.json").read_text())
        assert "injected failure on rank 1" in failed["error"]
        assert survivor["time"] - failed["time"] < timeout_s + 10
    finally:
        for p in context.processes:
            p.kill()
            p.join(10)


# ---------------------------------------------------------------------------- no processes needed
def test_row_shard_takes_each_ranks_block_and_rejects_uneven_batches():
    x = torch.arange(24.0).reshape(6, 4)
    parts = [next(RowShard(IteratorSource([x]), rank, 3)).x for rank in range(3)]
    assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ConfigError, match="6 rows cannot be split evenly over 4 ranks"):
        next(RowShard(IteratorSource([x]), 0, 4))


def test_toy_shards_are_independent_and_reject_uneven_batches():
    source = toy_source()
    assert source.shard(0, 1) is source
    a, b = source.shard(0, 2), source.shard(1, 2)
    xa, xb = next(a).x, next(b).x
    assert xa.shape == xb.shape == (BATCH // 2, 16) and not torch.equal(xa, xb)
    assert torch.equal(next(toy_source().shard(1, 2)).x, xb)  # a shard is a pure function of (seed, rank)
    with pytest.raises(ConfigError, match="batch_size=64 cannot be split evenly over 3 ranks"):
        source.shard(0, 3)


@pytest.mark.slow
def test_saelab_train_under_torchrun(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "sae: {architecture: topk, d_in: 16, d_sae: 32, k: 3}\n"
        "train: {steps: 20, progress: false, norm_estimation_batches: 2, log_every: 10}\n"
        "source: {type: toy, world: {n_features: 32, d: 16, firing_prob: 0.08}, batch_size: 64}\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "saelab.cli",
        "train",
        str(cfg),
        "--out",
        str(out),
        "--dist-timeout",
        "60",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 1 and records[0]["train_tokens"] == 20 * 64
    assert saelab.load(out / "sae").cfg.k == 3
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    assert json.loads((out / "checkpoints" / "step_000000020" / "state.json").read_text())["world_size"] == 2
