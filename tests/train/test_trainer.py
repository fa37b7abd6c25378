"""The training loop: exact resume, schedules, clear failures, and training on plain tensors."""

import json
import math

import pytest
import torch

import saelab
from saelab.errors import ConfigError, NonFiniteError
from saelab.toys import ToySource, World
from saelab.train import TrainConfig, Trainer
from saelab.train.trainer import geometric_median, lr_factor, sparsity_factor
from tests.conftest import TRAINED, small_config

WORLD = {"n_features": 48, "d": 16, "firing_prob": 0.06, "magnitude_std": 0.2}
FAST = {
    "steps": 40,
    "progress": False,
    "lr_warmup_steps": 5,
    "sparsity_warmup_steps": 10,
    "norm_estimation_batches": 2,
    "log_every": 10,
    "dead_after_tokens": 2000,
}


def toy_source(seed=0):
    return ToySource(World(WORLD), batch_size=64, seed=seed)


class KilledSource(ToySource):
    """A source that dies after `kill_at` batches, as a process killed mid-run would."""

    def __init__(self, kill_at: int, **kw):
        super().__init__(World(WORLD), batch_size=64, **kw)
        self.kill_at = kill_at

    def __next__(self):
        if self.position >= self.kill_at:
            raise KeyboardInterrupt("killed")
        return super().__next__()


@pytest.mark.parametrize("architecture", TRAINED)
def test_killed_run_resumes_to_the_same_weights(architecture, tmp_path):
    cfg = small_config(architecture, d_in=16, d_sae=48)
    straight = saelab.create(cfg)
    Trainer(straight, toy_source(), {**FAST, "checkpoint_every": 10}, tmp_path / "a").fit()

    first = saelab.create(cfg)
    # norm estimation reads 2 batches and rewinds, so batch 27 is training step 27
    with pytest.raises(KeyboardInterrupt):
        Trainer(first, KilledSource(kill_at=27), {**FAST, "checkpoint_every": 10}, tmp_path / "b").fit()
    resumed = saelab.create(cfg)  # a fresh process: new objects, state only from disk
    result = Trainer(resumed, toy_source(), {**FAST, "checkpoint_every": 10}, tmp_path / "b").fit()
    assert result.steps == 40
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    log_a = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert log_a == log_b == [10, 20, 30, 40]


def test_nan_activations_stop_training_with_step_named_and_checkpoint_kept(tmp_path):
    class Poisoned(ToySource):
        def __next__(self):
            b = super().__next__()
            if self.position == 25:
                b.x[3, 2] = float("nan")
            return b

    sae = saelab.create(small_config("topk", d_in=16, d_sae=48))
    trainer = Trainer(sae, Poisoned(World(WORLD), 64), {**FAST, "checkpoint_every": 10}, tmp_path)
    with pytest.raises(NonFiniteError, match=r"step 24: batch 25 contains NaN"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000000020"
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_training_on_plain_tensors_that_saelab_did_not_generate():
    gen = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    codes = (torch.rand(64 * 200, 16, generator=gen) < 0.1).float() * 3.0
    data = list((codes @ directions + 5.0).split(64))  # an offset the geometric median should find
    result = saelab.train({"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 2}, data, {**FAST, "steps": 200})
    sae = result.sae
    x = torch.cat(data[:4])
    fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.5
    assert result.input_scale != 1.0  # trained on scaled inputs, returned folded for raw ones


def test_source_that_runs_out_says_so():
    data = [torch.randn(32, 16) for _ in range(5)]
    with pytest.raises(ConfigError, match="ran out after"):
        saelab.train(small_config("relu", d_in=16, d_sae=32), data, {**FAST, "steps": 10})


def test_wrong_width_source_is_rejected_before_training():
    with pytest.raises(ConfigError, match="d_in"):
        Trainer(saelab.create(small_config("relu", d_in=12)), toy_source(), FAST)


def test_unknown_train_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown key 'step'.*steps"):
        TrainConfig.parse({"step": 10})


def test_schedules_warm_up_and_decay():
    cfg = TrainConfig(steps=100, lr_warmup_steps=10, lr_decay_fraction=0.2, sparsity_warmup_steps=50)
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 50) == 1.0
    assert lr_factor(cfg, 90) == pytest.approx(0.5)
    assert lr_factor(cfg, 99) == pytest.approx(0.05)
    assert sparsity_factor(cfg, 24) == pytest.approx(0.5) and sparsity_factor(cfg, 80) == 1.0


def test_geometric_median_is_robust_to_outliers():
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(999, 5, generator=gen) * 0.1 + 2.0
    points = torch.cat([points, torch.full((200, 5), 100.0)])
    median = geometric_median(points)
    assert (median - 2.0).abs().max() < 0.1  # the mean would be near 18

    # it minimises the summed distance: small perturbations do not lower it
    def cost(m):
        return (points - m).norm(dim=1).sum()

    for _ in range(20):
        assert cost(median) <= cost(median + 0.01 * torch.randn(5, generator=gen)) + 1e-3


def test_input_scale_makes_expected_norm_sqrt_d(tmp_path):
    src = toy_source()
    trainer = Trainer(saelab.create(small_config("relu", d_in=16, d_sae=32)), src, FAST)
    trainer.start(resume=False)
    x = torch.cat([next(src).x for _ in range(20)]) * trainer.input_scale
    assert x.norm(dim=1).mean().item() == pytest.approx(math.sqrt(16), rel=0.05)


def test_dead_latents_are_counted_in_tokens():
    from saelab.train.stats import LatentStats

    stats = LatentStats(3, dead_after_tokens=100, dense_threshold=0.5)
    for _ in range(4):
        stats.update(torch.tensor([30, 0, 0]), 30)
    stats.update(torch.tensor([10, 0, 10]), 10)
    assert stats.dead_mask().tolist() == [False, True, False]
    assert stats.dense_fraction() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sae": {"d_sae": 40}}, "d_sae"),
        ({"sae": {"architecture": "relu"}}, "architecture"),
        ({"train": {"lr": 0.01}}, "lr"),
        ({"train": {"steps": 60}}, "steps"),
    ],
)
def test_resuming_with_changed_settings_names_what_changed(change, field, tmp_path):
    sae_cfg = small_config("topk", d_in=16, d_sae=48)
    Trainer(saelab.create(sae_cfg), toy_source(), FAST, tmp_path).fit()
    new_sae = {
        k: v
        for k, v in {**sae_cfg, **change.get("sae", {})}.items()
        if not (k == "k" and change.get("sae", {}).get("architecture") == "relu")
    }
    with pytest.raises(ConfigError, match=field):
        Trainer(saelab.create(new_sae), toy_source(), {**FAST, **change.get("train", {})}, tmp_path).fit()


def test_logging_and_checkpoint_frequency_may_change_on_resume(tmp_path):
    cfg = small_config("topk", d_in=16, d_sae=48)
    Trainer(saelab.create(cfg), toy_source(), {**FAST, "steps": 40}, tmp_path).fit()
    result = Trainer(saelab.create(cfg), toy_source(), {**FAST, "steps": 40, "log_every": 5}, tmp_path).fit()
    assert result.steps == 40


def test_a_checkpoint_folder_without_its_pointer_is_still_found(tmp_path):
    from saelab.train import checkpoint as ckpt

    Trainer(
        saelab.create(small_config("relu", d_in=16, d_sae=48)), toy_source(), {**FAST, "checkpoint_every": 10}, tmp_path
    ).fit()
    (tmp_path / "checkpoints" / "latest").unlink()  # as if killed between the folder and the pointer
    assert ckpt.latest(tmp_path).name == "step_000000040"


@pytest.mark.parametrize("architecture", sorted(set(saelab.list_architectures(one_stream=True)) - set(TRAINED)))
def test_fitted_baselines_are_fitted_beside_the_loop_deterministically(architecture):
    cfg = small_config(architecture, d_in=16, d_sae=24)
    first, second = (saelab.train(cfg, toy_source(), FAST) for _ in range(2))
    assert first.steps == 0 and first.tokens == 2 * 64  # the norm-estimation batches, nothing else
    for (name, a), b in zip(first.sae.state_dict().items(), second.sae.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between two fits"
    with pytest.raises(ConfigError, match="fitted in closed form"):
        Trainer(saelab.create(cfg), toy_source(), FAST)
