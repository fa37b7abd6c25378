"""The U-AND model h = ReLU(W x + b), y = R h + c, and its training loop.

Shapes follow the science notes rather than the SAE convention: W is [d, n_in] (one row per
neuron), R is [P, d] (one row per pair). Any subset of {W, b, R, c} (and W2, b2 for the optional
second hidden layer) can be frozen; frozen parameters are buffers-in-spirit: `requires_grad`
is off and the optimizer never sees them, so they cannot move.

Loss: positives are rare (about C(s,2)/C(m,2) of outputs for AND), so plain MSE is minimised
by predicting nearly zero everywhere. The default "balanced" loss is the mean of the MSE over
target-1 outputs and the MSE over target-0 outputs within each batch, so both classes weigh
equally whatever their frequency; "mse" gives the plain mean for comparison.

Training rule (muP for Adam, Yang et al. "Tensor Programs V"): a weight matrix whose fan-in is a
hidden width (the read-out R, and W2 of the optional second layer) learns at
lr * base_width / fan_in; W (fan-in m or d0, fixed), the biases and c learn at lr. With one lr
for all, each of R's d inputs moves by about lr per Adam step, so the output moves by about
d * lr: at d = 1000 the run ends in a noise floor 10x higher than at d = 100, and more neurons
gave a *worse* model (balanced MSE 0.014 at d = 200, 0.031 at d = 1000, m = 100, 1000 steps).
With the rule the error falls monotonically up to d = 1000 at the same lr and step count (see
docs/results/uand_all_default.md).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from saelab.errors import ConfigError
from saelab.uand.config import UANDConfig
from saelab.uand.data import UANDTask, touched_pairs

INITS = ("gaussian", "uniform", "binary", "skewed_binary")


def random_weights(
    shape: tuple[int, ...], dist: str, generator: torch.Generator, scale: float = 1.0, skew: float = 0.5
) -> torch.Tensor:
    """Random weights with root-mean-square `scale`, so distributions compare at equal power.

    binary is +-scale with P(+) = 1/2; skewed_binary is +-scale with P(+) = `skew`.
    """
    if dist == "gaussian":
        return torch.randn(shape, generator=generator) * scale
    if dist == "uniform":
        return (torch.rand(shape, generator=generator) * 2 - 1) * (scale * math.sqrt(3.0))
    if dist in ("binary", "skewed_binary"):
        p = 0.5 if dist == "binary" else skew
        plus = torch.rand(shape, generator=generator) < p
        return torch.where(plus, scale, -scale)
    raise ConfigError(f"init={dist!r}: choose one of {INITS}")


class ModelConfig(UANDConfig):
    """Architecture, initial weights and which parameters stay frozen."""

    d: int = Field(100, ge=1, description="number of hidden ReLU neurons")
    d2: int | None = Field(None, ge=1, description="optional second hidden layer width (boolean circuits)")
    init: Literal["gaussian", "uniform", "binary", "skewed_binary"] = Field(
        "gaussian", description="distribution of the initial (or frozen) W"
    )
    scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="root-mean-square of the initial W entries")
    skew: float = Field(0.5, ge=0, le=1, description="P(+) of skewed_binary weights")
    bias_init: float = Field(0.0, allow_inf_nan=False, description="initial value of every hidden bias")
    frozen: tuple[str, ...] = Field((), description="parameters kept at their initial value")

    @field_validator("frozen", mode="before")
    @classmethod
    def _names_as_tuple(cls, names):
        return tuple(names) if isinstance(names, list) else names  # a list from JSON or YAML is fine

    @field_validator("frozen")
    @classmethod
    def _known_parameters(cls, names: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = {"W", "b", "R", "c"} | ({"W2", "b2"} if info.data.get("d2") is not None else set())
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"frozen={list(names)}: unknown parameter(s) {unknown}; choose from {sorted(known)}")
        return names


class UANDModel(nn.Module):
    """One (or two) ReLU layers and a linear read-out to every pair."""

    def __init__(self, n_in: int, n_out: int, config: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        gen = generator or torch.Generator().manual_seed(0)
        d = config.d
        self.W = nn.Parameter(random_weights((d, n_in), config.init, gen, config.scale, config.skew))
        self.b = nn.Parameter(torch.full((d,), float(config.bias_init)))
        last = d
        if config.d2 is not None:
            self.W2 = nn.Parameter(torch.randn(config.d2, d, generator=gen) / math.sqrt(d))
            self.b2 = nn.Parameter(torch.zeros(config.d2))
            last = config.d2
        # A zero read-out starts at the trivial predictor; W still learns from the second step on.
        self.R = nn.Parameter(torch.zeros(n_out, last))
        self.c = nn.Parameter(torch.zeros(n_out))
        for name in config.frozen:
            getattr(self, name).requires_grad_(False)

    @classmethod
    def for_task(cls, task: UANDTask, config: ModelConfig, seed: int = 0) -> UANDModel:
        return cls(task.n_in, task.n_pairs, config, torch.Generator().manual_seed(seed))

    @property
    def d(self) -> int:
        return self.W.shape[0]

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """The neuron activations the read-out sees (the last hidden layer)."""
        h = torch.relu(inputs @ self.W.T + self.b)
        if self.config.d2 is not None:
            h = torch.relu(h @ self.W2.T + self.b2)
        return h

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.c, self.hidden(inputs), self.R.T)


def uand_loss(
    pred: torch.Tensor, y: torch.Tensor, kind: str = "balanced", cells: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain MSE, the mean of the per-class MSEs ("balanced"), or of the per-cell MSEs ("cells").

    "cells" weighs the input cells 00/01/10/11 of every pair equally; it is the loss for tables
    such as XOR whose rare cell 11 sits inside the common negative class.
    """
    sq = (pred - y).square()
    if kind == "mse":
        return sq.mean()
    if kind == "cells":
        if cells is None:
            raise ConfigError("loss='cells' needs the cell index of every output")
        terms = [sq[cells == v].mean() for v in range(4) if bool((cells == v).any())]
        return torch.stack(terms).mean()
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:  # a batch with one class only: its mean is the whole loss
        return sq.mean()
    w_pos, w_neg = 0.5 / n_pos, 0.5 / n_neg
    return (sq * torch.where(pos, w_pos, w_neg)).sum()


def full_output_loss(
    model: UANDModel, task: UANDTask, x: torch.Tensor, inputs: torch.Tensor, kind: str = "balanced"
) -> torch.Tensor:
    """`uand_loss(model(inputs), task.targets(x), kind)`, without building the dense targets.

    When every cell-00 target is 0 (AND, OR, XOR, ...; no circuit step) only the outputs with an
    active input (about s*m of the C(m, 2) per row) have a non-zero target, so the sum of squared
    errors is sum(pred^2) plus a correction on those outputs, and the positives all lie among
    them. This saves the [n, P] target and mask tensors and their passes (about a third of a
    step at m = 100, d = 50). Other tables, circuits and the "cells" loss take the dense path.
    """
    pred = model(inputs)
    if kind == "cells" or task.circuit_table is not None or float(task.table[0]) != 0.0:
        return uand_loss(pred, task.targets(x), kind, task.cells(x) if kind == "cells" else None)
    rows, pairs = touched_pairs(x)
    p = pred[rows, pairs]
    y = task.targets_at(x, rows, pairs)
    err = (p - y).square()
    total = pred.square().sum() + (err - p.square()).sum()  # sum of (pred - y)^2 over all outputs
    count = pred.numel()
    if kind == "mse":
        return total / count
    pos = y > 0.5
    n_pos = int(pos.sum())
    if n_pos == 0 or n_pos == count:
        return total / count
    s_pos = err[pos].sum()
    return 0.5 * s_pos / n_pos + 0.5 * (total - s_pos) / (count - n_pos)


def _grouped_loss(sq: torch.Tensor, weight: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    """Mean over groups of the weighted mean squared error (one group: the plain weighted mean)."""
    if group is None:
        return (sq * weight).sum() / weight.sum()
    terms = []
    for g in group.unique():
        sel = group == g
        terms.append((sq[sel] * weight[sel]).sum() / weight[sel].sum())
    return torch.stack(terms).mean()


class _RowDot(torch.autograd.Function):
    """out[e] = h[rows[e]] . R[pairs[e]] + c[pairs[e]], with a backward that writes each gradient once.

    Plain indexing (h[rows] * R[pairs]).sum(-1) gives the same values, but autograd's backward
    for it zero-fills and accumulates extra [P, d]- and [E, d]-sized tensors: at m = 1000 that
    was most of a step.
    """

    @staticmethod
    def forward(ctx, h, R, c, rows, pairs):
        ctx.save_for_backward(h, R, rows, pairs)
        hr = h.index_select(0, rows)
        return torch.einsum("ed,ed->e", hr, R.index_select(0, pairs)) + c.index_select(0, pairs)

    @staticmethod
    def backward(ctx, grad):
        h, R, rows, pairs = ctx.saved_tensors
        grad_h = grad_R = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.zeros_like(h).index_add_(0, rows, R.index_select(0, pairs) * grad[:, None])
        if ctx.needs_input_grad[1]:
            grad_R = torch.zeros_like(R).index_add_(0, pairs, h.index_select(0, rows) * grad[:, None])
        if ctx.needs_input_grad[2]:
            grad_c = grad.new_zeros(R.shape[0]).index_add_(0, pairs, grad)
        return grad_h, grad_R, grad_c, None, None


def sampled_output_loss(
    model: UANDModel,
    task: UANDTask,
    x: torch.Tensor,
    inputs: torch.Tensor,
    kind: str,
    n_cols: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The same loss as `uand_loss`, estimated without computing all C(m, 2) outputs.

    Every output with an active input (cells 01, 10, 11: about s*m per row) is computed exactly;
    the cell-00 outputs, which share one target, are estimated from `n_cols` random columns, each
    sampled cell-00 entry standing for its row's share of them. With n_cols = P it is exact.
    Cost per row falls from P*d to (s*m + n_cols)*d: what makes m = 1000 trainable on a CPU.
    """
    h = model.hidden(inputs)
    n, P = len(x), task.n_pairs
    rows, pairs = touched_pairs(x)
    cols = torch.randperm(P, generator=generator)[: min(n_cols, P)]
    pred_t = _RowDot.apply(h, model.R, model.c, rows, pairs)
    y_t = task.targets_at(x, rows, pairs)
    i, j = task.pairs
    idle = (x[:, i[cols]] == 0) & (x[:, j[cols]] == 0)  # [n, K]: sampled entries in cell 00
    n_idle = P - torch.bincount(rows, minlength=n)  # cell-00 outputs per row
    share = n_idle / idle.sum(1).clamp(min=1)  # how many outputs each sampled entry stands for
    pred_u = torch.addmm(model.c[cols], h, model.R[cols].T)[idle]
    y_u = task.targets_at(x, torch.arange(n)[:, None], cols[None, :])[idle]
    w_u = share[:, None].expand_as(idle)[idle]
    pred = torch.cat([pred_t, pred_u])
    y = torch.cat([y_t, y_u])
    weight = torch.cat([torch.ones_like(pred_t), w_u.to(pred.dtype)])
    sq = (pred - y).square()
    if kind == "mse":
        return _grouped_loss(sq, weight, None)
    if kind == "balanced":
        return _grouped_loss(sq, weight, (y > 0.5).long())
    cells = torch.cat([(2 * x[rows, i[pairs]] + x[rows, j[pairs]]).long(), torch.zeros(len(pred_u), dtype=torch.long)])
    return _grouped_loss(sq, weight, cells)


class TrainConfig(UANDConfig):
    """Adam on freshly sampled batches (the input space is too large to hold a fixed dataset)."""

    steps: int = Field(2000, ge=0, description="optimizer steps")
    batch_size: int = Field(256, ge=1, description="samples per step")
    lr: float = Field(1e-2, gt=0, allow_inf_nan=False, description="Adam learning rate (cosine-decayed to 10%)")
    base_width: int | None = Field(
        50,
        ge=1,
        description="muP width scaling: weights whose fan-in is a hidden width (R, W2) learn at "
        "lr * base_width / fan_in, the rest at lr; None: one lr for all",
    )
    loss: Literal["balanced", "cells", "mse"] = Field(
        "balanced", description="balanced: per-class mean; cells: per-input-cell mean; mse: plain"
    )
    seed: int = Field(0, description="seed of the training data stream")
    output_sample: int | None = Field(
        None,
        ge=1,
        description="if set, estimate the loss from the outputs with an active input plus this many "
        "random other outputs (unbiased per row; for large m)",
    )


def param_groups(model: UANDModel, config: TrainConfig) -> list[dict]:
    """Adam parameter groups of the trainable parameters under the muP width rule (module docstring).

    R and W2 (fan-in a hidden width) get lr * base_width / fan_in; W, b, b2 and c get lr.
    """
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = config.lr
        if config.base_width is not None and name in ("R", "W2"):
            lr = config.lr * config.base_width / param.shape[1]
        groups.append({"params": [param], "lr": lr, "name": name})
    return groups


def train(model: UANDModel, task: UANDTask, config: TrainConfig, log_every: int = 50) -> list[dict]:
    """Train the unfrozen parameters; returns the loss history [{step, loss}] every `log_every` steps."""
    groups = param_groups(model, config)
    if not groups:
        return []
    try:  # the fused kernel is several times faster on CPU (R has C(m, 2) * d entries)
        opt = torch.optim.Adam(groups, lr=config.lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(groups, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t / max(config.steps, 1), 1.0)))
    )
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    running = 0.0
    for step in range(1, config.steps + 1):
        x, inputs = task.sample(config.batch_size, gen)
        if config.output_sample is not None:
            loss = sampled_output_loss(model, task, x, inputs, config.loss, config.output_sample, gen)
        else:
            loss = full_output_loss(model, task, x, inputs, config.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % log_every == 0 or step == config.steps:
            n = log_every if step % log_every == 0 else step % log_every
            history.append({"step": step, "loss": running / n})
            running = 0.0
    return history
