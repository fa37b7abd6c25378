"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope).

f_i = pi_i * H(pi_i - theta_i) with a learnable per-latent threshold theta = exp(log_threshold),
trained on ||x - x_hat||^2 + lambda * L0. The step function has no useful gradient, so theta
gets straight-through pseudo-derivatives from a rectangle kernel of width `bandwidth`:
  d/dtheta JumpReLU(z) = -(theta/eps) K((z - theta)/eps),  d/dtheta H(z - theta) = -(1/eps) K(.)
On disk the threshold is stored as `threshold` (SAELens), in memory as `log_threshold`.

Thresholds start at sqrt(lambda), their break-even point (see `coefficient_changed`), which is
1.0 for the default lambda 1 on inputs scaled to E||x|| = sqrt(d_in). The bandwidth is in those
units too; it is not what limits convergence (on a Zipf-rate toy world L0 after 800 steps is the
same, 10.3, with bandwidth 0.05 and 0.5: the thresholds sit at their break-even point from the
start, and L0 falls as the encoder learns). `target_l0` sets the L0 instead of lambda
(`saelab.sae.target_l0`); dead latents are resampled (`SAE.resample`).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat

from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.sparse import SparseActs, sparse_selection
from saelab.sae.target_l0 import TargetL0


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 on |u| <= 1/2."""
    return (u.abs() <= 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > threshold).to(z.dtype)
        grad_threshold = -(threshold / eps) * rectangle((z - threshold) / eps) * grad_out
        return grad_z, _sum_to(grad_threshold, threshold.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((z - threshold) / eps) * grad_out
        return torch.zeros_like(z), _sum_to(grad_threshold, threshold.shape), None


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grad.reshape(-1, *shape).sum(0) if grad.dim() > len(shape) else grad


def jumprelu(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(z, threshold, bandwidth)


def step(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(z, threshold, bandwidth)


class JumpReLUConfig(SAEConfig):
    architecture: str = "jumprelu"
    l0_coefficient: NonNegativeFloat = Field(1.0, description="lambda on the L0 penalty.")
    bandwidth: PositiveFloat = Field(
        0.05,
        description="Width eps of the rectangle kernel in the threshold's pseudo-derivative "
        "(paper: 1e-3 with long training; wider learns thresholds in fewer steps).",
    )
    target_l0: PositiveFloat | None = Field(
        None,
        description="Train to this L0: l0_coefficient is then only the starting value, adapted every "
        "step after the sparsity warm-up (logged as l0_coefficient).",
    )
    init_threshold: PositiveFloat | None = Field(
        None,
        description="Initial threshold for every latent (None: sqrt(l0_coefficient), the break-even "
        "point where firing a unit-decoder latent saves as much squared error as its L0 costs; 1.0 "
        "without an L0 coefficient). Inputs are scaled to E||x|| = sqrt(d_in), so pre-activations "
        "are about unit size.",
    )

    @property
    def resolved_init_threshold(self) -> float:
        if self.init_threshold is not None:
            return self.init_threshold
        return math.sqrt(self.l0_coefficient) if self.l0_coefficient > 0 else 1.0


@register
class JumpReLUSAE(TargetL0, SAE):
    architecture = "jumprelu"
    Config = JumpReLUConfig
    sweep_parameter = "l0_coefficient"
    sweep_kind = "coefficient"
    transcodes = True
    crosscodes = True
    resamples_dead = True
    coefficient_field = "l0_coefficient"
    RESAMPLE_ENCODER_FROM = "residual"  # then scaled to clear the threshold (`after_resample`)

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.resolved_init_threshold)))
        self.init_target_l0()

    def latent_parameters(self) -> list[tuple[torch.nn.Parameter, int]]:
        return super().latent_parameters() + [(self.log_threshold, 0)]

    @torch.no_grad()
    def coefficient_changed(self, factor: float) -> None:
        """Thresholds follow the L0 coefficient at once, by its square root: firing a latent whose
        decoder row has norm n with value z lowers the summed squared error by about (z n)^2 and
        costs lambda, so its break-even threshold is sqrt(lambda) / n. Left to Adam, log-thresholds
        move by at most about lr per step, and a controller on lambda alone winds up while they lag."""
        self.log_threshold.add_(0.5 * math.log(factor))

    @torch.no_grad()
    def after_resample(self, latents: torch.Tensor, preact_on_row: torch.Tensor, rows: torch.Tensor) -> None:
        """A resampled latent takes the median alive threshold, and its encoder column (along its
        row's residual) is rescaled so its pre-activation on its own row is `RESAMPLE_MARGIN` times
        that: it fires where the feature its row missed is at least half as large, not on
        everything (a low threshold would make it dense, and with `target_l0` the L0 jump would
        drive the coefficient up and every threshold with it)."""
        alive = torch.ones_like(self.log_threshold, dtype=torch.bool)
        alive[latents] = False
        theta = self.threshold[alive].median() if alive.any() else self.threshold.new_tensor(1.0)
        self.W_enc[:, latents] *= (self.RESAMPLE_MARGIN * theta / preact_on_row.clamp_min(1e-12)).to(self.W_enc.dtype)
        self.log_threshold[latents] = theta.log()

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return jumprelu(pre, self.threshold, self.cfg.bandwidth)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.training_pre_acts(x)
        with torch.no_grad():
            # Gradients reach the active latents and, for the threshold, those within half a
            # bandwidth below it; everything else has zero gradient and can stay out of the graph.
            sel = sparse_selection(pre >= self.threshold - self.cfg.bandwidth / 2)
        threshold = self.threshold
        if sel is not None:
            z, threshold = self.preacts_with_grad(pre, x, sel), threshold[sel.flat_cols]
            f = jumprelu(z, threshold, self.cfg.bandwidth)
            x_hat = self.decode_selected(sel, f)
            acts = SparseActs(sel, f.detach())
        else:
            z = self.preacts_with_grad(pre, x)
            f = jumprelu(z, threshold, self.cfg.bandwidth)
            x_hat = self.decode(f)
            acts = f
        l0 = step(z, threshold, self.cfg.bandwidth).sum() / x.shape[0]
        coefficient = self.sparsity_coefficient(ctx, l0)
        return TrainOutput(
            x_hat,
            acts,
            {"mse": mse_per_token(x_hat, ctx.target_for(x)), "l0": coefficient * l0},
        )

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = super().saved_state()
        state["threshold"] = state.pop("log_threshold").exp()
        return state

    def load_saved_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold")
        tensors["log_threshold"] = threshold.clamp_min(torch.finfo(threshold.dtype).tiny).log()
        super().load_saved_state(tensors)
