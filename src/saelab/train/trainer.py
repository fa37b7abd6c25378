"""The one training loop for every architecture, and for any number of dictionaries at once.

A run trains one or more *members* (dictionaries) on one activation stream; a single run is a run
of one member. Per step the `Trainer` draws one batch (one model forward, for model sources) and
scales it once; then each member asks its SAE for the named loss terms, backpropagates, lets the
SAE adjust gradients (unit-norm decoder), clips, takes an Adam step, lets the SAE adjust weights
(renormalise, thresholds), and updates dead/dense latent statistics. Learning rate and sparsity
warm-up are pure functions of the step, so a resumed run sees the same values.

A member trains exactly as it would alone on the same source, config and seed: the input scale,
b_dec and `init_from_data` sample come from the same first batches (computed once), and each
member owns its copy of the global RNGs (torch, NumPy, Python), swapped in around all it does.

Layout: a single SAE trains in OUT itself (OUT/metrics.jsonl, OUT/checkpoints/); several members
train in OUT/<name>/ each, and OUT/members.json names them. Every member checkpoint holds the
source position, and a run resumes from the newest step at which every member has a complete
checkpoint (old checkpoints are pruned only after every member has saved), so a run killed
between two members' saves resumes from the previous common step. A damaged checkpoint (a
truncated or altered file, found by its checksum) is set aside with a warning and the run
resumes from the newest intact one. Resuming also compares the SAE, training and (when the
caller describes it: `source_config`) data-source configs with the checkpoint's, naming any
field that changed.

While `fit` runs with an out folder it holds the folder's run lock (one writer per folder), and
SIGINT (Ctrl-C) or SIGTERM stops it after the current step with a checkpoint written, raising
`TrainingInterrupted`; running again resumes from there.

Fitted baselines (PCA, ICA, NMF, dictionary learning: `SAE.fitted`) have nothing to train by
gradient: `train`/`train_many` fit them on the first batches (`fit_dictionary`), beside this loop.
Under torch.distributed each rank trains on its share of every batch and gradients are averaged
over ranks; everything that involves other ranks goes through `saelab.train.distributed`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import math
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from saelab.activations.base import ActivationSource, Batch, as_source
from saelab.config import StrictModel
from saelab.errors import ConfigError, FileFormatError, NonFiniteError, SaelabWarning, TrainingInterrupted
from saelab.io.atomic import append_line, read_json, remove_stale_temp, write_json
from saelab.io.lock import holds_lock, run_lock
from saelab.progress import bar as progress_bar
from saelab.sae.base import SAE, SAEConfig, StepContext, mse_per_token
from saelab.train import checkpoint as ckpt
from saelab.train.distributed import DataParallel
from saelab.train.e2e import E2EConfig
from saelab.train.sinks import MetricSinks
from saelab.train.stats import LatentStats


class TrainConfig(StrictModel):
    """How to train (not what): every field has a default that works on toy worlds."""

    steps: PositiveInt = Field(2000, description="Optimizer steps (one batch each).")
    lr: PositiveFloat = Field(1e-3, description="Peak Adam learning rate.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), strict=False, description="Adam (beta1, beta2).")
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
        200_000,
        description="A latent is dead after this many tokens without firing, or when over a window of "
        "this many tokens it fired less than `dead_below_relative` times as often as the mean latent.",
    )
    dead_below_relative: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="Zombie rule: dead when its firing frequency over the dead window is below this "
        "fraction of the mean latent's (L0 / d_sae); 0 keeps only 'no firing for dead_after_tokens'.",
    )
    revive_every_tokens: NonNegativeInt | None = Field(
        None,
        description="Tokens between revivals of dead latents by resampling, for architectures that "
        "resample (the threshold families; TopK-style ones use AuxK every step instead). None: "
        "dead_after_tokens; 0: never. No revival in the last quarter of the final learning-rate decay.",
    )
    dense_threshold: float = Field(0.1, gt=0, le=1, description="A latent is dense above this firing frequency.")
    log_every: PositiveInt = Field(50, description="Steps between metrics-log records.")
    log_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Also log each record to TensorBoard (OUT/tensorboard) and/or W&B offline (OUT/wandb).",
    )
    checkpoint_every: NonNegativeInt = Field(0, description="Steps between checkpoints (0: only at the end).")
    keep_checkpoints: PositiveInt = Field(2, description="How many recent checkpoints to keep.")
    seed: int = Field(0, description="Seed for torch's global RNG during training.")
    progress: bool = Field(True, description="Show a progress bar.")
    device: str = Field("cpu", description="torch device ('cpu', 'cuda', ...).")
    objective: E2EConfig | None = Field(
        None,
        description="What the dictionary is trained to do: None (or 'local'): reconstruct its activations; "
        "'e2e' or a mapping {downstream: [...], kl_coefficient, downstream_coefficient}: end-to-end, "
        "KL(p_clean || p_spliced) through the frozen model after the hookpoint (e2e+ds with `downstream`). "
        "Needs a model source (saelab train) or saelab.train_e2e.",
    )

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_shorthand(cls, v):
        if v == "local":
            return None
        return {} if v == "e2e" else v

    @field_validator("device")
    @classmethod
    def _device_exists(cls, v: str) -> str:
        problem = device_problem(v)
        if problem:
            raise ValueError(problem)
        return v


def device_problem(device: str) -> str | None:
    """Why torch cannot use `device` on this machine, or None (checked before anything runs)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1', 'mps', ..."
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{device!r} was asked for but this machine has no usable CUDA; use 'cpu'"
        if parsed.index is not None and parsed.index >= count:
            return f"{device!r} does not exist: this machine has {count} CUDA device(s)"
    if parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return f"{device!r} was asked for but MPS is not available here; use 'cpu'"
    return None


# Revival stops for the last this-fraction of the final learning-rate decay (the last 5% of steps by default).
REVIVAL_STOPS_IN_DECAY = 0.25


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


@dataclass(frozen=True)
class SiteView:
    """Where a dictionary reads and what it writes, as `Batch.view` takes them, with both widths.

    Every member of a run shares one view (they train on one stream). `read`/`write` None mean
    the batch's own activations; `write` None also means "what is read" (an SAE, a crosscoder).
    """

    read: tuple[str, ...] | None
    write: tuple[str, ...] | None
    d_in: int
    d_out: int

    @classmethod
    def of(cls, cfg: SAEConfig) -> SiteView:
        read, write = cfg.read_sites, cfg.write_sites if cfg.is_transcoder else None
        return cls(_tuple(read), _tuple(write), cfg.d_in, cfg.output_width)

    @property
    def keys(self) -> list[str]:
        """The sites whose scales this view needs ("" for the batch's own activations)."""
        return list(self.read or [""]) + list(self.write or [])

    def factors(self, scales: dict[str, float]) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The multipliers of the input and of the target: a number for one site, else one per column."""

        def factor(names: list[str] | None, width: int) -> float | torch.Tensor:
            names = names or [""]
            if len(names) == 1:
                return scales[names[0]]
            return torch.tensor([scales[n] for n in names]).repeat_interleave(width // len(names))

        s_in = factor(self.read, self.d_in)
        return s_in, (s_in if self.write is None else factor(self.write, self.d_out))


def _tuple(names: list[str] | None) -> tuple[str, ...] | None:
    return None if names is None else tuple(names)


@dataclass
class DataInit:
    """What the first batches decide before step 0, for every SAE trained on that source."""

    scales: dict[str, float]  # per site, the multiplier bringing its mean norm to sqrt(width)
    b_dec: torch.Tensor | None  # None: keep the SAE's own (zeros); the target's centre otherwise
    b_in: torch.Tensor | None  # a transcoder's input bias: the input's centre (None: an SAE)
    sample: Batch  # the first batches, scaled, for `SAE.init_from_data`

    @property
    def input_scale(self) -> float:
        return next(iter(self.scales.values()))


@dataclass
class TrainResult:
    """A trained dictionary, ready to use: `sae` takes raw activations (the input scale it was
    trained with, `input_scale`, is already folded into its weights; `site_scales` has each
    site's when it reads or writes several)."""

    sae: SAE
    input_scale: float
    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    latent_stats: LatentStats | None = None
    site_scales: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WarmStart:
    """Continue training an already trained (folded) dictionary on new data, as one stage of a
    stage-wise model diff: nothing is initialised from the data (no b_dec, no `init_from_data`),
    the input scale is `input_scale` (a number, or a mapping {site: scale} for a dictionary over
    several sites, as `TrainResult.site_scales` gives it), not one estimated on the new data, so
    every stage trains in the first stage's space and weights stay comparable across stages.

    Latent identities stay fixed: dead latents are never resampled, and the sparsity coefficient
    is at full strength from step 0 (its warm-up is for a dictionary trained from scratch). The
    optimizer is a fresh Adam with the config's lr, warm-up and decay, so every stage that uses
    one config is optimised identically. The returned SAE is the given one plus the folded change,
    so a stage that changes nothing returns its input bit for bit.
    """

    input_scale: float | Mapping[str, float]

    def scales(self, view: SiteView) -> dict[str, float]:
        """{site: scale} for the sites `view` reads and writes ("" for the batch's own activations)."""
        keys = list(dict.fromkeys(view.keys))
        if not isinstance(self.input_scale, Mapping):
            value = float(self.input_scale)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"warm_start.input_scale must be a positive number (got {self.input_scale!r})")
            return dict.fromkeys(keys, value)
        given = {str(k): float(v) for k, v in self.input_scale.items()}
        if len(keys) == 1 and keys[0] not in given and len(given) == 1:
            given = {keys[0]: next(iter(given.values()))}
        missing = [k for k in keys if k not in given]
        if missing:
            raise ConfigError(
                f"warm_start.input_scale has no scale for site(s) {missing}; give {{site: scale}} for {keys}"
            )
        bad = {k: given[k] for k in keys if not math.isfinite(given[k]) or given[k] <= 0}
        if bad:
            raise ConfigError(f"warm_start.input_scale must be positive for every site (got {bad})")
        return {k: given[k] for k in keys}


def next_checked_batch(source: ActivationSource, view: SiteView, device: str, where: str) -> Batch:
    """The source's next batch as a dictionary with `view` sees it (`Batch.view`), with `x` (and
    `target`) on `device` as float32, checked for shape and NaN/Inf; `where` names the position."""
    try:
        batch = next(source).view(_list(view.read), _list(view.write))
    except StopIteration:
        raise ConfigError(
            f"the source ran out after {getattr(source, 'position', '?')} batches, at {where}; "
            "lower `steps` (or `norm_estimation_batches`) or give more data"
        ) from None
    same = batch.target is batch.x
    x = _checked(batch.x, view.d_in, where, source, "d_in", device)
    batch.x = x
    batch.target = x if same else _checked(batch.target, view.d_out, where, source, "d_out", device)
    if batch.target.shape[0] != x.shape[0]:
        raise ConfigError(f"batch at {where} has {x.shape[0]} input rows but {batch.target.shape[0]} target rows")
    return batch


def check_view_against_source(view: SiteView, source: Any) -> None:
    """Before training: every site a dictionary reads and writes exists in a source that names
    its sites (`site_widths`), with widths that add up to d_in and d_out; else d_in is the source's."""
    widths: dict[str, int] | None = getattr(source, "site_widths", None)
    if not widths or view.read is None:
        if getattr(source, "d_in", -1) not in (-1, view.d_in):
            raise ConfigError(
                f"the source yields d_in={source.d_in} but the SAE has d_in={view.d_in}; set d_in to match"
            )
        return
    for field_name, names, width in (("site", view.read, view.d_in), ("write_site", view.write, view.d_out)):
        if names is None:
            continue
        for name in names:
            if name not in widths:
                near = difflib.get_close_matches(name, list(widths), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise ConfigError(
                    f"{field_name}: the source has no site '{name}'{hint} (its sites: {', '.join(widths)})"
                )
        total = sum(widths[n] for n in names)
        if len({widths[n] for n in names}) > 1:
            each = ", ".join(f"{n}: {widths[n]}" for n in names)
            raise ConfigError(
                f"{field_name}: a dictionary over several sites needs equal widths, but they differ ({each})"
            )
        if total != width:
            what = "d_in" if field_name == "site" else "d_out"
            raise ConfigError(
                f"{field_name} {list(names)} {'is' if len(names) == 1 else 'are'} {total} wide in the source but the "
                f"SAE has {what}={width}; set {what}: {total}"
            )


def _list(names: tuple[str, ...] | None) -> list[str] | None:
    return None if names is None else list(names)


def _checked(t: torch.Tensor, width: int, where: str, source, name: str, device: str) -> torch.Tensor:
    t = t.to(device, torch.float32)
    if t.dim() != 2 or t.shape[1] != width:
        what = "" if name == "d_in" else " target"
        raise ConfigError(f"batch{what} at {where} has shape {tuple(t.shape)}; expected [B, {width}] ({name})")
    if t.shape[0] == 0:
        raise ConfigError(f"batch at {where} is empty (0 rows); check the source's batch_size and data")
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).any(1).nonzero().flatten()[:5].tolist()
        raise NonFiniteError(
            f"{where}: batch {getattr(source, 'position', '?')} contains NaN/Inf activations (rows {bad}...); "
            "training stopped"
        )
    return t


def data_init(source: ActivationSource, view: SiteView, cfg: TrainConfig, dist: DataParallel) -> DataInit:
    """Per-site scales, b_dec (and a transcoder's b_in) and the scaled sample from the first
    batches (every rank's, combined), after which the source is rewound so training still sees them."""
    start = source.state_dict()
    # drawn with autograd on, as training draws them: a source that builds itself lazily may need it
    batches = [
        next_checked_batch(source, view, cfg.device, f"norm-estimation batch {i}")
        for i in range(cfg.norm_estimation_batches)
    ]
    with torch.no_grad():
        x = torch.cat([dist.all_rows(b.x) for b in batches])
        same = all(b.target is b.x for b in batches)
        y = x if same else torch.cat([dist.all_rows(b.target) for b in batches])
        scales: dict[str, float] = {}
        for names, data in ((view.read or ("",), x), (view.write or (), y)):
            for name, part in zip(names, data.chunk(len(names), dim=1)) if names else ():
                scales[name] = _site_scale(part, cfg, name)
        s_in, s_out = view.factors(scales)
        x = x * s_in
        y = x if same else y * s_out
        b_dec = b_in = None
        if cfg.b_dec_init == "geometric_median":
            b_dec = geometric_median(y[:8192])
            b_in = None if same else geometric_median(x[:8192])
        elif cfg.b_dec_init == "mean":
            b_dec, b_in = y.mean(0), (None if same else x.mean(0))
        tokens = [b.tokens for b in batches]
        if all(t is not None for t in tokens):
            tokens = torch.cat([dist.all_rows(t.to(x.device)) for t in tokens])
        else:
            tokens = None
    source.load_state_dict(start)
    return DataInit(scales, b_dec, b_in, Batch(x=x, tokens=tokens, target=None if same else y))


def _site_scale(part: torch.Tensor, cfg: TrainConfig, name: str) -> float:
    """sqrt(width) / mean norm: the multiplier that gives the site mean norm sqrt(width)."""
    if cfg.normalize_activations != "expected_norm":
        return 1.0
    mean_norm = float(part.norm(dim=1).mean())
    if mean_norm == 0:
        where = f"site '{name}'" if name else "activation"
        raise ConfigError(f"every {where} in the first batches is zero; check the source")
    return math.sqrt(part.shape[1]) / mean_norm


class Member:
    """One dictionary's training state in a run: SAE, optimizer, schedules, latent statistics,
    metrics log, checkpoints and its own RNG stream. The `Trainer` drives it; `train_step` is the
    public single step (benchmarks time it on a fixed batch)."""

    def __init__(
        self,
        name: str,
        sae: SAE,
        cfg: TrainConfig,
        out_dir: Path | None,
        dist: DataParallel,
        source_config: dict[str, Any] | None = None,
        objective: Any = None,
        warm_start: WarmStart | None = None,
    ):
        self.name = name
        self.warm_start = warm_start
        self._warm_origin: tuple[dict, dict] | None = None  # (given weights, their unfold-fold round trip)
        self.objective = objective  # None: the SAE's own train_forward; else objective(sae, x, ctx)
        self.source_config = source_config
        self.cfg = cfg
        self.sae = sae.to(cfg.device)
        self.dist = dist
        self.out_dir = out_dir
        self.optimizer = make_adam(self.sae, cfg)
        self.stats = LatentStats(
            sae.cfg.d_sae, cfg.dead_after_tokens, cfg.dense_threshold, dist.sum, cfg.dead_below_relative
        )
        self.revived_total = 0  # latents revived by resampling so far
        self._revived_since_record = 0
        self.step = 0
        self.tokens = 0
        self.scales: dict[str, float] = {}  # per site, the multiplier the SAE is trained on
        self.history: list[dict[str, Any]] = []
        self._loss_terms = self.sae.train_forward  # through DDP once `start` knows the starting weights
        self.rng: tuple | None = None  # this member's global-RNG states between its turns
        self._input_factor: float | torch.Tensor = 1.0  # SiteView.factors(scales)[0], once scales are known

    def start(self, checkpoint: Path | None, init: DataInit | None, source: ActivationSource) -> None:
        """Resume from `checkpoint` (the source position too), or initialise from the data;
        then open the metrics log and start the clocks. A warm start (`WarmStart`) takes the given
        weights into the training space of its fixed scale instead of initialising anything."""
        if self.warm_start is not None:
            self._begin_warm_start()
        if checkpoint is not None:
            self._load(checkpoint, source)
        elif self.warm_start is None:
            with torch.no_grad():
                if init.b_dec is not None:
                    self.sae.b_dec.copy_(init.b_dec)
                if init.b_in is not None and self.sae.cfg.is_transcoder:
                    self.sae.b_in.copy_(init.b_in)
                self.sae.init_from_data(init.sample)
            self.scales = self.dist.sync_from_main(self.sae, dict(init.scales))  # every rank starts from rank 0's
        if self.objective is None:
            self._loss_terms = self.dist.loss_fn(self.sae)
        else:  # an objective beyond reconstruction (end-to-end): one rank only, checked by the Trainer
            self._loss_terms = lambda x, ctx: self.objective(self.sae, x, ctx)
        factor = SiteView.of(self.sae.cfg).factors(self.scales)[0]
        self._input_factor = factor.to(self.cfg.device) if isinstance(factor, torch.Tensor) else factor
        log_path = self.out_dir / "metrics.jsonl" if self.out_dir and self.dist.is_main else None
        if log_path is not None:
            self.history = _read_log(log_path, up_to_step=self.step) if checkpoint is not None else []
            _write_log(log_path, self.history)
        config = {"sae": self.sae.cfg.model_dump(mode="json"), "train": self.cfg.model_dump(mode="json")}
        self.sinks = MetricSinks(self.cfg.log_to if self.dist.is_main else [], self.out_dir, self.name, config)
        self._start_time = time.perf_counter()
        self._window = (self._start_time, self.tokens)
        self.sae.train()

    @torch.no_grad()
    def _begin_warm_start(self) -> None:
        """Unfold the given (raw-activation) weights into the space of the warm start's scales, and
        keep them and their unfold-fold round trip: `result` returns given + (folded end - round
        trip), which is the folded end exactly in real arithmetic, and the given weights bit for bit
        when training changed nothing (a float32 round trip alone moves about 1 weight in 7 by an ulp)."""
        view = SiteView.of(self.sae.cfg)
        self.scales = self.dist.sync_from_main(self.sae, self.warm_start.scales(view))
        s_in, s_out = view.factors(self.scales)
        given = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        self.sae.fold_scales(1.0 / s_in, 1.0 / s_out)
        round_trip = copy.deepcopy(self.sae)
        round_trip.fold_scales(s_in, s_out)
        self._warm_origin = (given, {k: v.detach().clone() for k, v in round_trip.state_dict().items()})

    @property
    def input_scale(self) -> float:
        """The scale of the (first) site read: the one number most runs have."""
        return next(iter(self.scales.values()))

    def advance(self, batch: Batch, x: torch.Tensor, target: torch.Tensor) -> dict[str, Any] | None:
        """One step on a checked batch whose scaled activations are `x` (encoder input) and
        `target` (what the decoder must reproduce); returns the metrics record on logging steps."""
        out = self.train_step(x, batch, target)
        self.step += 1
        self.tokens += x.shape[0] * self.dist.world_size  # every rank's share is the same size
        if not (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps):
            return None
        now = time.perf_counter()
        record = self._record(out, target, (self.tokens - self._window[1]) / max(now - self._window[0], 1e-9))
        self._window = (now, self.tokens)
        self.history.append(record)
        if self.out_dir and self.dist.is_main:
            append_line(self.out_dir / "metrics.jsonl", json.dumps(record))
        self.sinks.write(record)
        return record

    def train_step(self, x: torch.Tensor, batch: Batch | None = None, target: torch.Tensor | None = None):
        """Loss terms, backward, the architecture's gradient and weight hooks, clipping, Adam and
        latent statistics, at the member's current step (its schedules); returns the TrainOutput."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.cfg, self.step)
        ctx = StepContext(
            sparsity_scale=self._sparsity_scale(self.step),
            dead_mask=self.stats.dead_mask().to(x.device),
            step=self.step,
            total_steps=self.cfg.steps,
            batch=batch,
            target=x if target is None else target,
            input_factor=self._input_factor,
        )
        goal = ctx.target  # the full target (a skip transcoder's step takes its skip part off ctx's)
        out = self._loss_terms(x, ctx)
        loss = out.loss
        if not torch.isfinite(loss):
            terms = {k: float(v) for k, v in out.losses.items()}
            raise NonFiniteError(
                f"step {self.step}: the loss is not finite ({terms}); training stopped before the update; "
                "lower lr or check the activations' scale"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.before_optimizer_step()
        if self.cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.sae.after_optimizer_step(out)
        self.stats.update(out.fired_counts(), x.shape[0])
        if self._revival_due(x.shape[0] * self.dist.world_size):
            self.revive(x, goal, out.x_hat)
        return out

    def _sparsity_scale(self, step: int) -> float:
        """The sparsity warm-up factor; a warm start is already sparse and keeps full strength."""
        return 1.0 if self.warm_start is not None else sparsity_factor(self.cfg, step)

    def _revival_due(self, batch_tokens: int) -> bool:
        """Whether this step crosses a multiple of `revive_every_tokens` (a pure function of the
        tokens seen, so a resumed run revives at the same steps), until the last quarter of the
        final lr decay: latents revived early in the decay still have steps to learn, and those
        that die in it would otherwise stay dead (measured in docs/results/revival.md).
        Never in a warm start: resampling would change what a latent is between stages."""
        every = self.cfg.revive_every_tokens
        every = self.cfg.dead_after_tokens if every is None else every
        if not every or not self.sae.revives_by_resampling or self.warm_start is not None:
            return False
        if self.step >= self.cfg.steps - int(self.cfg.steps * self.cfg.lr_decay_fraction * REVIVAL_STOPS_IN_DECAY):
            return False
        before = self.tokens
        return (before + batch_tokens) // every > before // every

    @torch.no_grad()
    def revive(self, x: torch.Tensor, target: torch.Tensor, x_hat: torch.Tensor) -> int:
        """Resample the dead latents towards this batch's worst-reconstructed rows (`SAE.resample`),
        give them fresh Adam moments and a fresh dead-window; returns how many were revived."""
        dead = self.stats.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        idx = dead.to(x.device)
        # rows drawn from the combined batch (every rank's, in rank order), as one process would
        x, target, x_hat = (self.dist.all_rows(t.detach().contiguous()) for t in (x, target, x_hat))
        self.sae.resample(idx, x, target, x_hat)
        self.dist.sync_from_main(self.sae, None)  # every rank keeps rank 0's resampled weights
        for param, axis in self.sae.latent_parameters():
            for value in self.optimizer.state.get(param, {}).values():
                if value.shape == param.shape:
                    value.index_fill_(axis, idx, 0.0)
        self.stats.reset(dead)
        self.revived_total += dead.numel()
        self._revived_since_record += dead.numel()
        return dead.numel()

    def _record(self, out, target: torch.Tensor, tokens_per_s: float) -> dict[str, Any]:
        with torch.no_grad():
            remaining = (self.cfg.steps - self.step) * target.shape[0] * self.dist.world_size / max(tokens_per_s, 1e-9)
            return {
                "step": self.step,
                "tokens": self.tokens,
                "lr": self.optimizer.param_groups[0]["lr"],
                "sparsity_scale": self._sparsity_scale(self.step - 1),
                "losses": {k: float(v) for k, v in out.losses.items()},
                "loss": float(out.loss),
                "l0": out.mean_l0(),
                "fvu": fvu(out.x_hat, target),
                "dead_fraction": self.stats.dead_fraction(),
                "dense_fraction": self.stats.dense_fraction(),
                "tokens_per_s": tokens_per_s,
                "eta_s": remaining,
                **self._revival_record(),
                **self.sae.training_metrics(),
            }

    def _revival_record(self) -> dict[str, int]:
        """Latents revived by resampling since the last record and in all (architectures that resample)."""
        if not self.sae.revives_by_resampling:
            return {}
        revived, self._revived_since_record = self._revived_since_record, 0
        return {"revived": revived, "revived_total": self.revived_total}

    def result(self) -> TrainResult:
        """The trained dictionary with the input scale folded in (it takes raw activations)."""
        self.sinks.close()
        self.sae.eval()
        self.sae.release_training_buffers()  # a trained SAE kept for analysis should not hold them
        self.sae.fold_scales(*SiteView.of(self.sae.cfg).factors(self.scales))
        if self._warm_origin is not None:
            with torch.no_grad():
                given, round_trip = self._warm_origin
                for key, value in self.sae.state_dict().items():
                    if value.is_floating_point():
                        value.copy_(given[key] + (value - round_trip[key]))
        return TrainResult(
            self.sae,
            self.input_scale,
            self.step,
            self.tokens,
            time.perf_counter() - self._start_time,
            self.history,
            self.stats,
            dict(self.scales),
        )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, source: ActivationSource) -> Path | None:
        """Every rank calls this: rank 0 writes the shared state plus each rank's source and RNG
        state, and the others wait until it is on disk (None on those ranks). Pruning is the
        Trainer's, once every member has saved this step."""
        ranks = self.dist.gather_to_main(ckpt.local_state(source))
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "input_scale": self.input_scale,
            "site_scales": self.scales,
            "sae_config": self.sae.cfg.model_dump(),
            "train_config": self.cfg.model_dump(),
            "source_config": self.source_config,
            "revived_total": self.revived_total,
            "revived_since_record": self._revived_since_record,
            "warm_start": self.scales if self.warm_start is not None else None,
        }
        path = ckpt.save(self.out_dir, self.step, state, self.sae, self.optimizer, self.stats, ranks=ranks)
        self.dist.barrier()
        return path

    def _load(self, path: Path, source: ActivationSource) -> None:
        saved = ckpt.read_state(path)
        if saved.get("world_size", 1) != self.dist.world_size:
            raise ConfigError(
                f"checkpoint {path} was written by a run on {saved.get('world_size', 1)} process(es) but this "
                f"run has {self.dist.world_size}; each rank's data position is saved, so resume with "
                f"{saved.get('world_size', 1)} (torchrun --nproc_per_node) or use a new --out folder"
            )
        _check_same_config("SAE", saved["sae_config"], self.sae.cfg.model_dump(), path)
        _check_same_config("training", saved["train_config"], self.cfg.model_dump(), path, ignore=_BOOKKEEPING)
        if saved.get("source_config") is not None or self.source_config is not None:
            _check_same_config("data source", saved.get("source_config") or {}, self.source_config or {}, path)
        warm = self.scales if self.warm_start is not None else None
        if saved.get("warm_start") != warm:
            was = f"a warm start at scales {saved['warm_start']}" if saved.get("warm_start") else "a fresh start"
            now = f"a warm start at scales {warm}" if warm else "a fresh start"
            raise ConfigError(
                f"checkpoint {path} was written by {was}, not {now} (warm_start); resume it the way it "
                "was started or use a new --out folder"
            )
        state = ckpt.load(path, self.sae, self.optimizer, self.stats, source, rank=self.dist.rank)
        self.step, self.tokens = state["step"], state["tokens"]
        self.revived_total = state.get("revived_total", 0)
        self._revived_since_record = state.get("revived_since_record", 0)
        keys = SiteView.of(self.sae.cfg).keys
        self.scales = state.get("site_scales") or {keys[0]: state["input_scale"]}
        if sorted(self.scales) != sorted(set(keys)):
            raise ConfigError(
                f"checkpoint {path} holds scales for sites {sorted(self.scales)}, not {sorted(set(keys))}"
            )


def fvu(x_hat: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the target's variance (about its batch mean) the reconstruction leaves unexplained."""
    with torch.no_grad():
        resid = (target - x_hat).pow(2).sum(-1).mean()
        total = (target - target.mean(0)).pow(2).sum(-1).mean()
        return float(resid / total.clamp_min(1e-12))


# Training settings every member of one run must share: they shape the one stream, its start and
# its checkpoints.
SHARED = frozenset(
    {
        "steps",
        "normalize_activations",
        "norm_estimation_batches",
        "b_dec_init",
        "device",
        "checkpoint_every",
        "keep_checkpoints",
        "progress",
        "objective",
    }
)
MEMBERS_FILE = "members.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


class Trainer:
    """Train one SAE, or several of one `d_in` (any architectures and widths), on one source;
    resumable from `out_dir`.

    `saes` is one SAE (or config dict), trained in `out_dir` itself, or a list (member names
    default to `00_topk`, `01_relu`, ...) or dict from name to member, each trained in
    `out_dir/<name>`. A member config may carry `name` (list form) and `train`, overrides of
    `train_config` for that member (any key but those in `SHARED`). `fit` returns a `TrainResult`
    for one SAE, else a dict of them by name; every SAE comes back ready (input scale folded in).

    `source_config`: a JSON-able description of the data (`saelab.run` passes the source and
    held-out source specs). It goes into every checkpoint, and resuming with a different one is
    refused with the changed fields named. Without it (raw iterables from Python) the data
    cannot be checked: resuming on other data is then the caller's responsibility.
    """

    def __init__(
        self,
        saes: SAE | dict | Sequence[SAE | dict] | Mapping[str, SAE | dict],
        data: Any,
        train_config: TrainConfig | dict | None = None,
        out_dir: str | Path | None = None,
        source_config: dict[str, Any] | None = None,
        objective: Any = None,
        warm_start: WarmStart | None = None,
    ):
        cfg = train_config if isinstance(train_config, TrainConfig) else TrainConfig.parse(train_config or {})
        single = isinstance(saes, SAE) or (isinstance(saes, Mapping) and "architecture" in saes)
        members = _members([saes] if single else saes, cfg)
        self._setup(members, data, cfg, out_dir, single, source_config, objective, warm_start)

    @classmethod
    def of_members(
        cls,
        members: list[tuple[str, SAE, TrainConfig]],
        data: Any,
        cfg: TrainConfig,
        out_dir: str | Path | None,
        source_config: dict[str, Any] | None = None,
        objective: Any = None,
        warm_start: WarmStart | None = None,
    ) -> Trainer:
        """A run of members already named and configured (see `_members`)."""
        trainer = cls.__new__(cls)
        trainer._setup(members, data, cfg, out_dir, False, source_config, objective, warm_start)
        return trainer

    def _setup(
        self,
        members,
        data,
        cfg: TrainConfig,
        out_dir,
        single: bool,
        source_config=None,
        objective=None,
        warm_start=None,
    ) -> None:
        self.cfg, self.single = cfg, single
        if warm_start is not None and not isinstance(warm_start, WarmStart):
            raise ConfigError(f"warm_start must be a saelab.train.WarmStart, got {type(warm_start).__name__}")
        self.warm_start = warm_start
        if (cfg.objective is None) != (objective is None):
            raise ConfigError(
                "train.objective is 'e2e' but no model was given to run it: use saelab.train_e2e, or saelab train "
                "with a model source"
                if objective is None
                else "an objective was passed but train.objective is not set; set train.objective (e.g. 'e2e')"
            )
        if source_config is not None:
            try:
                source_config = json.loads(json.dumps(source_config))
            except (TypeError, ValueError):
                raise ConfigError("source_config must be a JSON-able mapping describing the data") from None
            if not isinstance(source_config, dict):
                raise ConfigError("source_config must be a JSON-able mapping describing the data")
        d_ins = {sae.cfg.d_in for _, sae, _ in members}
        if len(d_ins) > 1:
            widths = ", ".join(f"{name}: {sae.cfg.d_in}" for name, sae, _ in members)
            raise ConfigError(f"every SAE in a sweep reads the same activations, but their d_in differ ({widths})")
        self.d_in = d_ins.pop()
        views = {name: SiteView.of(sae.cfg) for name, sae, _ in members}
        if len(set(views.values())) > 1:
            names = ", ".join(f"{name}: reads {v.read!r}, writes {v.write or v.read!r}" for name, v in views.items())
            raise ConfigError(f"every SAE in one run reads and writes the same sites, but theirs differ ({names})")
        self.view = next(iter(views.values()))
        if warm_start is not None:
            warm_start.scales(self.view)  # a missing or bad scale is named before anything runs
        self.dist = DataParallel()  # one rank unless a torch.distributed process group is running
        if objective is not None and self.dist.active:
            raise ConfigError("end-to-end training runs on one process; launch it without torchrun")
        self.source: ActivationSource = self.dist.shard(as_source(data, self.d_in))
        check_view_against_source(self.view, self.source)
        for name, sae, _ in members:
            if sae.fitted:
                raise ConfigError(
                    f"{name}: '{sae.architecture}' is fitted in closed form, not trained by gradient; "
                    "use saelab.train / saelab.train_many, which fit it on the first batches"
                )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.members: dict[str, Member] = {}
        for name, sae, member_cfg in members:
            folder = self.out_dir if self.single or self.out_dir is None else self.out_dir / name
            self.members[name] = Member(name, sae, member_cfg, folder, self.dist, source_config, objective, warm_start)
        self.step = 0
        self._saved_step: int | None = None  # the step of the newest checkpoint on disk, once known
        self._stop: int | None = None  # the signal that asked the loop to stop

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = True) -> TrainResult | dict[str, TrainResult]:
        """Train to `steps` (resuming from `out_dir` unless `resume=False`); see the class docstring."""
        locked = run_lock(self.out_dir) if self.out_dir is not None and self.dist.is_main else contextlib.nullcontext()
        with locked, self._stop_on_signals():
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult | dict[str, TrainResult]:
        self.start(resume)
        self._check_stop()
        bar = progress_bar(
            total=self.cfg.steps,
            initial=self.step,
            enabled=self.cfg.progress and self.dist.is_main,
            desc=next(iter(self.members.values())).sae.architecture if self.single else f"sweep of {len(self.members)}",
            unit="step",
        )
        while self.step < self.cfg.steps:
            try:
                record = next(iter(self.step_all().values()))
            except NonFiniteError as exc:
                raise NonFiniteError(f"{exc}; {self._checkpoint_note()}") from None
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
            if self.out_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            self._check_stop(bar)
        bar.close()
        if self.out_dir is not None and self._saved_step != self.step:
            self.save_checkpoint()
        results = {name: member.result() for name, member in self.members.items()}
        return next(iter(results.values())) if self.single else results

    def _checkpoint_note(self) -> str:
        """What is on disk to go back to, for a message about a stopped run."""
        if self.out_dir is None:
            return "nothing was saved (no out folder)"
        if self._saved_step is None:
            return "no checkpoint was written yet (set train.checkpoint_every to keep some)"
        return f"the newest checkpoint is step {self._saved_step} in {self.out_dir}"

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, SIGINT and SIGTERM ask the loop to stop after the current step (a second
        one stops at once); only the main thread can receive signals, elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(signum, frame):
            if self._stop is not None:
                raise KeyboardInterrupt
            self._stop = signum
            if self.dist.is_main:
                sys.stderr.write(
                    f"\nsaelab: {signal.Signals(signum).name} received: stopping after this step "
                    "(send it again to stop at once)\n"
                )

        self._stop = None
        previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _check_stop(self, bar=None) -> None:
        """If a signal asked to stop (on any rank), checkpoint (with an out folder) and raise."""
        stop = self._stop
        if self.dist.active:  # every rank stops at the same step, or the checkpoint's collectives hang
            asked = int(self.dist.sum(torch.tensor([int(stop is not None)], device=self.cfg.device)))
            stop = stop or (signal.SIGTERM if asked else None)
        if not stop:
            return
        if bar is not None:
            bar.close()
        for member in self.members.values():  # flush TensorBoard / W&B before the process ends
            if hasattr(member, "sinks"):
                member.sinks.close()
        name = signal.Signals(stop).name
        if self.out_dir is None:
            raise TrainingInterrupted(
                f"stopped by {name} at step {self.step} of {self.cfg.steps}; nothing was saved (no out folder)",
                stop,
            )
        if self._saved_step != self.step and self.step > 0:
            self.save_checkpoint()
        resumable = f"checkpoint at step {self.step} in {self.out_dir}" if self.step > 0 else "nothing to resume yet"
        raise TrainingInterrupted(
            f"stopped by {name} at step {self.step} of {self.cfg.steps} ({resumable}); "
            "run the same command again to resume",
            stop,
        )

    def start(self, resume: bool = True) -> None:
        """Resume every member from the newest step all of them saved (rank 0 decides, so all
        ranks agree while files change), or initialise them from the same first batches."""
        self._check_members_file()
        if self.out_dir is not None and self.dist.is_main:
            if holds_lock(self.out_dir):
                self._clean_stale_files()
            if not self.single:
                write_json(self.out_dir / MEMBERS_FILE, {"members": list(self.members)})
        step = None
        if resume and self.out_dir is not None:  # rank 0 checks the files, every rank takes its answer
            step = self.dist.from_main(self._resumable_step() if self.dist.is_main else None)
        self._saved_step = step
        fresh = step is None and self.warm_start is None
        init = data_init(self.source, self.view, self.cfg, self.dist) if fresh else None
        process_rng = ckpt.rng_state()  # what each member would find if it ran alone now
        for member in self.members.values():
            ckpt.set_rng_state(*process_rng)
            torch.manual_seed(member.cfg.seed)
            member.start(ckpt.step_path(member.out_dir, step) if step is not None else None, init, self.source)
            member.rng = ckpt.rng_state()
        lead = next(iter(self.members.values()))
        self.step = lead.step
        self.input_factor, self.target_factor = self.view.factors(lead.scales)
        if isinstance(self.input_factor, torch.Tensor):
            self.input_factor = self.input_factor.to(self.cfg.device)
        if isinstance(self.target_factor, torch.Tensor):
            self.target_factor = self.target_factor.to(self.cfg.device)

    @property
    def input_scale(self) -> float:
        """The multiplier of the (first) site read (see `SiteView.factors` for every site's)."""
        return next(iter(self.members.values())).input_scale

    def step_all(self, batch: Batch | None = None) -> dict[str, dict[str, Any] | None]:
        """One step of every member on `batch` (by default the source's next one); the metrics
        records by member name (None off logging steps)."""
        batch = batch or next_checked_batch(self.source, self.view, self.cfg.device, f"step {self.step}")
        x = batch.x * self.input_factor
        target = x if batch.target is batch.x else batch.target * self.target_factor
        records = {}
        for name, member in self.members.items():
            with self._own_rng(member):
                records[name] = member.advance(batch, x, target)
        self.step += 1
        return records

    @contextlib.contextmanager
    def _own_rng(self, member: Member) -> Iterator[None]:
        """Swap the member's RNG stream in; alone, its stream is the process's (nothing to swap)."""
        if len(self.members) == 1:
            yield
            return
        ckpt.set_rng_state(*member.rng)
        try:
            yield
        finally:
            member.rng = ckpt.rng_state()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Every member's checkpoint at this step (each with the source position), then pruning:
        until every member has saved, each keeps its previous checkpoints."""
        for member in self.members.values():
            with self._own_rng(member):  # each checkpoint records its member's own RNG stream
                member.save_checkpoint(self.source)
        self._saved_step = self.step
        if self.dist.is_main:
            for member in self.members.values():
                ckpt.prune(member.out_dir, self.cfg.keep_checkpoints)

    def _resumable_step(self) -> int | None:
        """The newest step at which every member has an intact checkpoint. A damaged one (a file
        missing, truncated or altered) is set aside with a warning naming it, and the search goes
        on to older steps."""
        folders = {name: ckpt.step_folders(member.out_dir) for name, member in self.members.items()}
        candidates = sorted(set.union(*(set(f) for f in folders.values())), reverse=True)
        for step in candidates:
            if not all(step in f for f in folders.values()):
                continue  # not every member got to save this step (killed between their saves)
            damaged = {name: ckpt.verify(f[step]) for name, f in folders.items()}
            damaged = {name: why for name, why in damaged.items() if why}
            for name, why in damaged.items():
                moved = ckpt.set_aside(folders[name][step])
                warnings.warn(
                    f"checkpoint {folders[name][step]} is damaged ({why}); skipped it (moved to {moved.name}) "
                    "and resume from an older one",
                    SaelabWarning,
                    stacklevel=3,
                )
            if not damaged:
                return step
        return None

    def _clean_stale_files(self) -> None:
        """Remove what killed writers left (temp files and checkpoint temp folders); the run lock
        guarantees no live writer owns them."""
        for folder in {self.out_dir, *(m.out_dir for m in self.members.values())}:
            if folder.is_dir():
                remove_stale_temp(folder)
                ckpt.remove_stale(folder)

    def _check_members_file(self) -> None:
        """One folder holds one run: a sweep's folder is not reused for a single SAE or another
        sweep, nor a single SAE's folder for a sweep (their results.json would overwrite each other)."""
        path = self.out_dir / MEMBERS_FILE if self.out_dir is not None else None
        if path is None:
            return
        if not path.exists():
            single_files = [
                n
                for n in ("checkpoints", "metrics.jsonl", "sae")
                if n not in self.members and (self.out_dir / n).exists()
            ]
            if not self.single and single_files:
                raise ConfigError(
                    f"{self.out_dir} holds a single-SAE run ({', '.join(single_files)}), not a sweep; "
                    "use a new --out folder for the sweep"
                )
            return
        saved = read_json(path, f"delete {self.out_dir} to start over")
        members = saved.get("members") if isinstance(saved, dict) else None
        if not isinstance(members, list):
            raise FileFormatError(f"{path} is unreadable (no `members` list); delete {self.out_dir} to start over")
        if self.single or members != list(self.members):
            now = "one SAE" if self.single else str(list(self.members))
            raise ConfigError(
                f"{self.out_dir} holds a sweep of {members}, not {now}; resume with the same SAEs "
                "in the same order or use a new --out folder"
            )


def _members(
    saes: Sequence[SAE | dict] | Mapping[str, SAE | dict], cfg: TrainConfig
) -> list[tuple[str, SAE, TrainConfig]]:
    """(name, SAE, training config) for each member, with every input mistake named."""
    from saelab.sae.registry import create

    if isinstance(saes, (SAE, str)) or not isinstance(saes, (Sequence, Mapping)) or not saes:
        raise ConfigError("a sweep needs a non-empty list (or dict by name) of SAEs or SAE configs")
    named = isinstance(saes, Mapping)
    members, seen = [], {}
    for i, (key, entry) in enumerate(saes.items() if named else enumerate(saes)):
        where = f"saes[{key!r}]" if named else f"saes[{i}]"
        overrides: Any = {}
        if isinstance(entry, SAE):
            sae, name = entry, key if named else None
        elif isinstance(entry, Mapping):
            values = dict(entry)
            name, overrides = values.pop("name", None), values.pop("train", None) or {}
            name = key if named else name
            try:
                sae = create(values)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            raise ConfigError(f"{where} must be an SAE or a config mapping with at least `architecture`")
        name = f"{i:02d}_{sae.architecture}" if name is None else name
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: name {name!r} must be a plain folder name (letters, digits, _ . = + -, not "
                "starting with . or -)"
            )
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is already used by {seen[name]}; names must be unique")
        if any(sae is other for _, other, _ in members):
            raise ConfigError(f"{where} is the same SAE object as an earlier member; create one SAE per member")
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{where}: `train` must be a mapping of training settings for this SAE")
        shared = sorted(SHARED & set(overrides))
        if shared:
            raise ConfigError(
                f"{where}: {shared} cannot differ between SAEs of one sweep (shared: {', '.join(sorted(SHARED))}); "
                "set them in the sweep's `train` section"
            )
        try:
            member_cfg = TrainConfig.parse({**cfg.model_dump(), **overrides}) if overrides else cfg
        except ConfigError as exc:
            raise ConfigError(f"{where}: train: {exc}") from None
        seen[name] = where
        members.append((name, sae, member_cfg))
    return members


# ---------------------------------------------------------------------------- fitted baselines
def fit_dictionary(sae: SAE, data: Any, train_config: TrainConfig | dict | None = None) -> TrainResult:
    """Fit a closed-form baseline (`sae.fitted`: PCA, ICA, NMF, dictionary learning) the way the
    loop starts a trained SAE (same input scale, b_dec and first batches), then measure its
    firing on those batches. Nothing to checkpoint: fitting is deterministic and quick."""
    cfg = train_config if isinstance(train_config, TrainConfig) else TrainConfig.parse(train_config or {})
    t0 = time.perf_counter()
    dist = DataParallel()
    sae = sae.to(cfg.device)
    source = dist.shard(as_source(data, sae.cfg.d_in))
    torch.manual_seed(cfg.seed)
    init = data_init(source, SiteView.of(sae.cfg), cfg, dist)
    stats = LatentStats(sae.cfg.d_sae, cfg.dead_after_tokens, cfg.dense_threshold)
    with torch.no_grad():
        if init.b_dec is not None:
            sae.b_dec.copy_(init.b_dec)
        sae.fit(init.sample)
        sae.eval()
        codes = sae.encode(init.sample.x)
        stats.update((codes != 0).sum(0), codes.shape[0])
        x_hat = sae.decode(codes, init.sample.tokens)
        mse = float(mse_per_token(x_hat, init.sample.x))
        record = {
            "step": 0,
            "tokens": codes.shape[0],
            "losses": {"mse": mse},
            "loss": mse,
            "l0": float((codes != 0).sum(-1).float().mean()),
            "fvu": fvu(x_hat, init.sample.x),
            "dead_fraction": float((stats.fire_count == 0).float().mean()),
            "dense_fraction": stats.dense_fraction(),
        }
    sae.fold_input_scale(init.input_scale)
    return TrainResult(sae, init.input_scale, 0, codes.shape[0], time.perf_counter() - t0, [record], stats)


# Training settings that change how a run is logged or stored, not what it computes.
_BOOKKEEPING = {"progress", "device", "log_every", "log_to", "checkpoint_every", "keep_checkpoints"}


def _check_same_config(kind: str, saved: dict, now: dict, path: Path, ignore: set[str] = frozenset()) -> None:
    """An exact resume needs the settings it was started with; say which ones changed."""
    saved = _flat(json.loads(json.dumps(saved)))  # tuples became lists in the JSON file
    now = _flat(json.loads(json.dumps(now)))
    # a setting added after the checkpoint was written, left unset now, changes nothing
    added_unset = {k for k in set(now) - set(saved) if now[k] is None}
    changed = sorted(k for k in set(saved) | set(now) if k not in ignore | added_unset and saved.get(k) != now.get(k))
    newer = [k for k in changed if k not in saved]
    if changed and len(newer) == len(changed):
        raise ConfigError(
            f"checkpoint {path} was written by an older saelab, before the {kind} setting(s) "
            f"{', '.join(newer)} existed; it cannot resume exactly under them: finish it with the saelab "
            "that started it, or use a new --out folder"
        )
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(
            f"checkpoint {path} was written with a different {kind} config ({diffs}); "
            "resume with the original settings or use a new --out folder"
        )


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested mappings as dotted keys (`source.world.firing_prob`), so a change is named exactly."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_adam(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the trainable parameters."""
    params = [p for p in sae.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"'{sae.architecture}' has no trainable parameters; nothing to train by gradient")
    try:  # the fused kernel is several times faster on CPU and GPU
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas)


def _read_log(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The log's records up to `up_to_step` (the resumed checkpoint), in step order. A damaged
    line (cut by a kill or a full disk, or edited by hand) is skipped with a warning: the lines
    after it are still good."""
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    bad = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            if line.strip():
                bad.append(number)
            continue
        if step <= up_to_step:
            by_step[step] = rec  # the last record of a step wins (a step logged again after a resume)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        warnings.warn(
            f"{path}: skipped {len(bad)} unreadable line(s) (line {shown}); the other records are kept",
            SaelabWarning,
            stacklevel=2,
        )
    return [by_step[k] for k in sorted(by_step)]


def _write_log(path: Path, records: list[dict[str, Any]]) -> None:
    from saelab.io.atomic import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def train(
    sae_or_config: SAE | dict,
    data: Any,
    train_config: TrainConfig | dict | None = None,
    out_dir: str | Path | None = None,
    source_config: dict[str, Any] | None = None,
    objective: Any = None,
    warm_start: WarmStart | None = None,
) -> TrainResult:
    """Train (or, for a fitted baseline, fit) any registered architecture on any source or
    iterable of [B, d_in] tensors. The returned SAE takes raw activations (input scale folded in).
    `source_config` describes the data for the resume check (see `Trainer`); `objective` replaces
    the SAE's own loss (an end-to-end objective, see `saelab.train.e2e`); `warm_start` continues
    a trained SAE at a fixed input scale without initialising anything from the data (`WarmStart`)."""
    from saelab.sae.registry import create

    sae = sae_or_config if isinstance(sae_or_config, SAE) else create(sae_or_config)
    if sae.fitted:
        if objective is not None:
            raise ConfigError(f"'{sae.architecture}' is fitted in closed form; it cannot train end to end")
        if warm_start is not None:
            raise ConfigError(f"'{sae.architecture}' is fitted in closed form; it cannot be warm-started")
        return fit_dictionary(sae, data, train_config)
    if warm_start is not None and not isinstance(sae_or_config, SAE):
        raise ConfigError("a warm start continues a trained SAE; pass the SAE itself, not a config")
    return Trainer(sae, data, train_config, out_dir, source_config, objective, warm_start).fit()


def train_many(
    saes: Sequence[SAE | dict] | Mapping[str, SAE | dict],
    data: Any,
    train_config: TrainConfig | dict | None = None,
    out_dir: str | Path | None = None,
    source_config: dict[str, Any] | None = None,
    objective: Any = None,
) -> dict[str, TrainResult]:
    """Train several SAEs from one pass over `data` (see `Trainer` for `saes`); each result is what
    `saelab.train` would return for that SAE alone. Fitted baselines among them are fitted on the
    first batches, the rest trained together. Resumes from `out_dir`."""
    cfg = train_config if isinstance(train_config, TrainConfig) else TrainConfig.parse(train_config or {})
    members = _members(saes, cfg)
    if objective is not None and any(sae.fitted for _, sae, _ in members):
        raise ConfigError("fitted baselines (PCA, ICA, ...) cannot train end to end; drop them from the sweep")
    results = {name: fit_dictionary(sae, data, mcfg) for name, sae, mcfg in members if sae.fitted}
    trained = [m for m in members if not m[1].fitted]
    if trained:
        results.update(Trainer.of_members(trained, data, cfg, out_dir, source_config, objective).fit())
    return {name: results[name] for name, _, _ in members}
