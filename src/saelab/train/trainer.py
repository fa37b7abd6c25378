"""The one training loop for every architecture.

Per step: draw a batch, scale it to E||x|| = sqrt(d_in), ask the SAE for its named loss terms,
backpropagate, let the SAE adjust gradients (unit-norm decoder), clip, take an Adam step, let the
SAE adjust weights (renormalise, thresholds), and update dead/dense latent statistics. Learning
rate and sparsity warm-up are pure functions of the step, so a resumed run sees the same values.
Under torch.distributed each rank trains on its share of every batch and gradients are averaged
over ranks; everything that involves other ranks goes through `saelab.train.distributed`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from tqdm.auto import tqdm

from saelab.activations.base import ActivationSource, Batch, as_source
from saelab.config import StrictModel
from saelab.errors import ConfigError, NonFiniteError
from saelab.sae.base import SAE, StepContext
from saelab.train import checkpoint as ckpt
from saelab.train.distributed import DataParallel
from saelab.train.stats import LatentStats


class TrainConfig(StrictModel):
    """How to train (not what): every field has a default that works on toy worlds."""

    steps: PositiveInt = Field(2000, description="Optimizer steps (one batch each).")
    lr: PositiveFloat = Field(1e-3, description="Peak Adam learning rate.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam (beta1, beta2).")
    lr_warmup_steps: NonNegativeInt = Field(50, description="Linear learning-rate warm-up from 0.")
    lr_decay_fraction: float = Field(0.2, ge=0, le=1, description="Final fraction of steps with linear decay to 0.")
    sparsity_warmup_steps: NonNegativeInt = Field(200, description="Linear warm-up of the sparsity coefficient.")
    grad_clip_norm: PositiveFloat | None = Field(1.0, description="Clip the gradient norm (None: no clipping).")
    normalize_activations: Literal["expected_norm", "none"] = Field(
        "expected_norm", description="Scale inputs so E||x|| = sqrt(d_in); folded into the weights when saving."
    )
    norm_estimation_batches: PositiveInt = Field(8, description="Batches used to estimate the input scale.")
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        "geometric_median", description="Initial b_dec (computed on the first batches)."
    )
    dead_after_tokens: PositiveInt = Field(
        200_000, description="A latent is dead after this many tokens without firing."
    )
    dense_threshold: float = Field(0.1, gt=0, le=1, description="A latent is dense above this firing frequency.")
    log_every: PositiveInt = Field(50, description="Steps between metrics-log records.")
    checkpoint_every: NonNegativeInt = Field(0, description="Steps between checkpoints (0: only at the end).")
    keep_checkpoints: PositiveInt = Field(2, description="How many recent checkpoints to keep.")
    seed: int = Field(0, description="Seed for torch's global RNG during training.")
    progress: bool = Field(True, description="Show a progress bar.")
    device: str = Field("cpu", description="torch device ('cpu', 'cuda', ...).")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    decay_steps = int(cfg.steps * cfg.lr_decay_fraction)
    decay_start = cfg.steps - decay_steps
    decay = (cfg.steps - step) / decay_steps if decay_steps and step >= decay_start else 1.0
    return warm * decay


def sparsity_factor(cfg: TrainConfig, step: int) -> float:
    return min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(1e-8)
        w = 1.0 / dist
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            return new
        median = new
    return median


@dataclass
class DataInit:
    """What the first batches decide before step 0, for every SAE trained on that source."""

    input_scale: float
    b_dec: torch.Tensor | None  # None: keep the SAE's own (zeros)
    sample: Batch  # the first batches, scaled, for `SAE.init_from_data`


@dataclass
class TrainResult:
    sae: SAE
    input_scale: float
    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    latent_stats: LatentStats | None = None


class Trainer:
    """Train one SAE on one activation source; resumable from `out_dir/checkpoints`."""

    def __init__(self, sae: SAE, source: Any, cfg: TrainConfig | dict | None = None, out_dir: str | Path | None = None):
        self.cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.parse(cfg or {})
        self.sae = sae.to(self.cfg.device)
        self.dist = DataParallel()  # one rank unless a torch.distributed process group is running
        self.source: ActivationSource = self.dist.shard(as_source(source, sae.cfg.d_in))
        if getattr(self.source, "d_in", -1) not in (-1, sae.cfg.d_in):
            raise ConfigError(
                f"the source yields d_in={self.source.d_in} but the SAE has d_in={sae.cfg.d_in}; set d_in to match"
            )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.optimizer = make_adam(self.sae, self.cfg)
        self._loss_terms = self.sae.loss_terms  # through DDP once `fit` knows the starting weights
        self.stats = LatentStats(sae.cfg.d_sae, self.cfg.dead_after_tokens, self.cfg.dense_threshold, self.dist.sum)
        self.step = 0
        self.tokens = 0
        self.input_scale: float | None = None
        self.history: list[dict[str, Any]] = []
        # Set by a sweep (train.sweep), which stores the shared source's position once and
        # prunes old checkpoints only after every member has saved.
        self.shares_source = False

    # ------------------------------------------------------------------ set-up
    def _next_x(self) -> torch.Tensor:
        return self._next_batch().x

    def _next_batch(self):
        """The next batch, with x on the device as float32 and checked for shape and NaN/Inf."""
        try:
            batch = next(self.source)
        except StopIteration:
            raise ConfigError(
                f"the source ran out after {self.step} steps but steps={self.cfg.steps}; "
                "lower `steps` or give more data"
            ) from None
        x = batch.x.to(self.cfg.device, torch.float32)
        if x.dim() != 2 or x.shape[1] != self.sae.cfg.d_in:
            raise ConfigError(
                f"batch at step {self.step} has shape {tuple(x.shape)}; expected [B, {self.sae.cfg.d_in}]"
            )
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(1).nonzero().flatten()[:5].tolist()
            raise NonFiniteError(
                f"step {self.step}: batch {getattr(self.source, 'position', self.step)} contains NaN/Inf "
                f"activations (rows {bad}...); training stopped, last good checkpoint kept"
                + (f" in {self.out_dir / 'checkpoints'}" if self.out_dir else "")
            )
        batch.x = x
        return batch

    def data_init(self) -> DataInit:
        """The input scale, b_dec and scaled sample from the first batches (every rank's, combined),
        after which the source is rewound so training still sees those batches."""
        start = self.source.state_dict()
        with torch.no_grad():
            batches = [self._next_batch() for _ in range(self.cfg.norm_estimation_batches)]
            sample = torch.cat([self.dist.all_rows(b.x) for b in batches])
            if self.cfg.normalize_activations == "expected_norm":
                mean_norm = float(sample.norm(dim=1).mean())
                if mean_norm == 0:
                    raise ConfigError("every activation in the first batches is zero; check the source")
                input_scale = math.sqrt(self.sae.cfg.d_in) / mean_norm
            else:
                input_scale = 1.0
            sample = sample * input_scale
            b_dec = None
            if self.cfg.b_dec_init == "geometric_median":
                b_dec = geometric_median(sample[:8192])
            elif self.cfg.b_dec_init == "mean":
                b_dec = sample.mean(0)
            tokens = [b.tokens for b in batches]
            if all(t is not None for t in tokens):
                tokens = torch.cat([self.dist.all_rows(t.to(sample.device)) for t in tokens])
            else:
                tokens = None
        self.source.load_state_dict(start)
        return DataInit(input_scale, b_dec, Batch(x=sample, tokens=tokens))

    def _initialise(self, init: DataInit | None = None) -> None:
        """Start from the data: `init` computed once may start several SAEs (see train.sweep)."""
        init = init or self.data_init()
        self.input_scale = init.input_scale
        with torch.no_grad():
            if init.b_dec is not None:
                self.sae.b_dec.copy_(init.b_dec)
            self.sae.init_from_data(init.sample)
        self.input_scale = self.dist.sync_from_main(self.sae, self.input_scale)  # every rank starts from rank 0's

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = True) -> TrainResult:
        torch.manual_seed(self.cfg.seed)
        # Rank 0 decides what to resume from, so all ranks agree even while files change.
        self.start(self.dist.from_main(ckpt.latest(self.out_dir) if resume and self.out_dir is not None else None))
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            disable=None if self.cfg.progress and self.dist.is_main else True,
            desc=self.sae.architecture,
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        while self.step < self.cfg.steps:
            batch = self._next_batch()
            record = self.advance(batch)
            if record is not None:
                bar.set_postfix(
                    {
                        **{k: f"{v:.3g}" for k, v in record["losses"].items()},
                        "L0": f"{record['l0']:.1f}",
                        "tok/s": f"{record['tokens_per_s']:.3g}",
                    },
                    refresh=False,
                )
            bar.update(1)
            if self.checkpoint_due():
                self.save_checkpoint()
        bar.close()
        if self.out_dir and self.dist.from_main(getattr(ckpt.latest(self.out_dir), "name", None)) != ckpt.step_name(
            self.step
        ):
            self.save_checkpoint()
        return self.result()

    # The loop's pieces, public so that one process can drive several trainers on one stream
    # (train.sweep): start, then advance once per batch, save when due, and take the result.
    def start(self, checkpoint: Path | None = None, init: DataInit | None = None) -> None:
        """Resume from `checkpoint`, or initialise from the data (or from a shared `init`);
        then open the metrics log and start the clocks."""
        if checkpoint is not None:
            self._load(checkpoint)
        else:
            self._initialise(init)
        self._loss_terms = self.dist.loss_fn(self.sae, trainable=self.optimizer is not None)
        log_path = self.out_dir / "metrics.jsonl" if self.out_dir and self.dist.is_main else None
        if log_path is not None:
            self.history = _read_log(log_path, up_to_step=self.step) if checkpoint is not None else []
            _write_log(log_path, self.history)
        self._start_time = time.perf_counter()
        self._window = (self._start_time, self.tokens)
        self.sae.train()

    def advance(self, batch: Batch, x: torch.Tensor | None = None) -> dict[str, Any] | None:
        """One step on a checked batch (`x`: its scaled activations, if already computed);
        returns the metrics record on logging steps."""
        x = batch.x * self.input_scale if x is None else x
        # A fitted model (no optimizer) does not change between steps: its forward pass runs
        # only on logging steps, which also feed the latent statistics.
        logging = (self.step + 1) % self.cfg.log_every == 0 or self.step + 1 == self.cfg.steps
        if self.optimizer is not None or logging:
            out = self._train_step(x, batch)
        self.step += 1
        self.tokens += x.shape[0] * self.dist.world_size  # every rank's share is the same size
        if not logging:
            return None
        now = time.perf_counter()
        record = self._record(out, x, (self.tokens - self._window[1]) / max(now - self._window[0], 1e-9))
        self._window = (now, self.tokens)
        self.history.append(record)
        if self.out_dir and self.dist.is_main:
            _append_log(self.out_dir / "metrics.jsonl", record)
        return record

    def checkpoint_due(self) -> bool:
        return bool(self.out_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0)

    def result(self) -> TrainResult:
        self.sae.eval()
        self.sae.release_training_buffers()  # a trained SAE kept for analysis should not hold them
        return TrainResult(
            self.sae,
            self.input_scale,
            self.step,
            self.tokens,
            time.perf_counter() - self._start_time,
            self.history,
            self.stats,
        )

    def _train_step(self, x: torch.Tensor, batch=None):
        for group in self.optimizer.param_groups if self.optimizer is not None else []:
            group["lr"] = self.cfg.lr * lr_factor(self.cfg, self.step)
        ctx = StepContext(
            sparsity_scale=sparsity_factor(self.cfg, self.step),
            dead_mask=self.stats.dead_mask().to(x.device),
            step=self.step,
            total_steps=self.cfg.steps,
            batch=batch,
        )
        with torch.set_grad_enabled(self.optimizer is not None):
            out = self._loss_terms(x, ctx)
        loss = out.loss
        if not torch.isfinite(loss):
            terms = {k: float(v) for k, v in out.losses.items()}
            raise NonFiniteError(
                f"step {self.step}: the loss is not finite ({terms}); training stopped before the update, "
                "last good checkpoint kept; lower lr or check the activations' scale"
            )
        if self.optimizer is not None:  # None: a fitted model (e.g. PCA) with nothing to train
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.sae.before_optimizer_step()
            if self.cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip_norm)
            self.optimizer.step()
        self.sae.after_optimizer_step(out)
        self.stats.update(out.fired_counts(), x.shape[0])
        return out

    def _record(self, out, x: torch.Tensor, tokens_per_s: float) -> dict[str, Any]:
        with torch.no_grad():
            resid = (x - out.x_hat).pow(2).sum(-1).mean()
            total = (x - x.mean(0)).pow(2).sum(-1).mean()
            remaining = (self.cfg.steps - self.step) * x.shape[0] * self.dist.world_size / max(tokens_per_s, 1e-9)
            return {
                "step": self.step,
                "tokens": self.tokens,
                "lr": self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0,
                "sparsity_scale": sparsity_factor(self.cfg, self.step - 1),
                "losses": {k: float(v) for k, v in out.losses.items()},
                "loss": float(out.loss),
                "l0": out.mean_l0(),
                "fvu": float(resid / total.clamp_min(1e-12)),
                "dead_fraction": self.stats.dead_fraction(),
                "dense_fraction": self.stats.dense_fraction(),
                "tokens_per_s": tokens_per_s,
                "eta_s": remaining,
            }

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Every rank calls this: rank 0 writes the shared state plus each rank's source and RNG
        state, and the others wait until it is on disk (None on those ranks)."""
        source = None if self.shares_source else self.source
        ranks = self.dist.gather_to_main(ckpt.local_state(source))
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "input_scale": self.input_scale,
            "sae_config": self.sae.cfg.model_dump(),
            "train_config": self.cfg.model_dump(),
        }
        path = ckpt.save(
            self.out_dir,
            self.step,
            state,
            self.sae,
            self.optimizer,
            self.stats,
            source,
            keep=None if self.shares_source else self.cfg.keep_checkpoints,
            ranks=ranks,
        )
        self.dist.barrier()
        return path

    def _load(self, path: Path) -> None:
        saved = ckpt.read_state(path)
        if saved.get("world_size", 1) != self.dist.world_size:
            raise ConfigError(
                f"checkpoint {path} was written by a run on {saved.get('world_size', 1)} process(es) but this "
                f"run has {self.dist.world_size}; each rank's data position is saved, so resume with "
                f"{saved.get('world_size', 1)} (torchrun --nproc_per_node) or use a new --out folder"
            )
        _check_same_config("SAE", saved["sae_config"], self.sae.cfg.model_dump(), path)
        _check_same_config("training", saved["train_config"], self.cfg.model_dump(), path, ignore=_BOOKKEEPING)
        source = None if self.shares_source else self.source
        state = ckpt.load(path, self.sae, self.optimizer, self.stats, source, rank=self.dist.rank)
        self.step, self.tokens, self.input_scale = state["step"], state["tokens"], state["input_scale"]


# Training settings that change how a run is logged or stored, not what it computes.
_BOOKKEEPING = {"progress", "device", "log_every", "checkpoint_every", "keep_checkpoints"}


def _check_same_config(kind: str, saved: dict, now: dict, path: Path, ignore: set[str] = frozenset()) -> None:
    """An exact resume needs the settings it was started with; say which ones changed."""
    saved = json.loads(json.dumps(saved))  # tuples became lists in the JSON file
    now = json.loads(json.dumps(now))
    changed = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            f"checkpoint {path} was written with a different {kind} config ({diffs}); "
            "resume with the original settings or use a new --out folder"
        )


def make_adam(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam | None:
    """Adam over the trainable parameters; None when there are none (fitted baselines)."""
    params = [p for p in sae.parameters() if p.requires_grad]
    if not params:
        return None
    try:  # the fused kernel is several times faster on CPU and GPU
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas)


def _read_log(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill
        if rec["step"] <= up_to_step:
            records.append(rec)
    return records


def _write_log(path: Path, records: list[dict[str, Any]]) -> None:
    from saelab.io.atomic import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(
    sae_or_config: SAE | dict,
    data: Any,
    train_config: TrainConfig | dict | None = None,
    out_dir: str | Path | None = None,
) -> TrainResult:
    """Train any registered architecture on any source or iterable of [B, d_in] tensors.

    Returns the trained SAE with the input scaling folded in, so it takes raw activations.
    """
    from saelab.sae.registry import create

    sae = sae_or_config if isinstance(sae_or_config, SAE) else create(sae_or_config)
    trainer = Trainer(sae, data, train_config, out_dir)
    result = trainer.fit()
    sae.fold_input_scale(result.input_scale)
    return result
