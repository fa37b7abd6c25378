"""p-annealing (Karvonen, Wright, Rager et al. 2024, arXiv 2408.00113), as a schedule for the ReLU family.

The sparsity penalty is lambda * sum_i (w_i f_i)^p (w_i: decoder norm in 'penalty' mode). p starts
at 1 (convex, the usual L1) and is lowered in `p_updates` equal steps to `p_end` < 1 between
`anneal_start_fraction` and `anneal_end_fraction` of training; L_p with p < 1 is a closer proxy for
L0 and shrinks large activations less. Whenever p changes, lambda is multiplied by
P_old(f) / P_new(f) on the current batch, so the penalty's size does not jump.

`LpAnnealing` is the schedule; any SAE whose sparsity penalty is a weighted sum of non-negative
latents can mix it in. `relu_panneal` is the ReLU SAE with it (same encoder, decoder and file).
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt, model_validator

from saelab.sae.base import StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.relu import ReLUConfig, ReLUSAE


def lp_penalty(acts: torch.Tensor, p: float) -> torch.Tensor:
    """mean over tokens of sum_i acts_i^p for acts >= 0, with a finite gradient at 0 (where it is 0)."""
    positive = acts > 0
    safe = torch.where(positive, acts, torch.ones_like(acts))
    return torch.where(positive, safe.pow(p), torch.zeros_like(acts)).sum(-1).mean()


class PAnnealConfig(ReLUConfig):
    architecture: str = "relu_panneal"
    p_start: float = Field(1.0, gt=0, le=1, description="Exponent at the start of training (1: L1).")
    p_end: float = Field(0.5, gt=0, le=1, description="Exponent reached at the end of the anneal, in (0, 1].")
    p_updates: PositiveInt = Field(10, description="Number of equal steps from p_start to p_end.")
    anneal_start_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of training before p first changes.")
    anneal_end_fraction: float = Field(0.8, gt=0, le=1, description="Fraction of training by which p reaches p_end.")

    @model_validator(mode="after")
    def _check_schedule(self):
        if self.p_end > self.p_start:
            raise ValueError(f"p_end={self.p_end} must not exceed p_start={self.p_start}; p is annealed downwards")
        if self.anneal_end_fraction <= self.anneal_start_fraction:
            raise ValueError(
                f"anneal_end_fraction={self.anneal_end_fraction} must exceed anneal_start_fraction={self.anneal_start_fraction}"
            )
        return self


class LpAnnealing:
    """Mixin: the L_p penalty with annealed p. State (current p, lambda multiplier) lives in buffers,
    so checkpoints resume it exactly. Call `_init_lp_annealing()` in `__init__`."""

    def _init_lp_annealing(self) -> None:
        self.register_buffer("p", torch.tensor(float(self.cfg.p_start)))
        self.register_buffer("coefficient_scale", torch.tensor(1.0))

    def scheduled_p(self, step: int, total_steps: int) -> float:
        cfg = self.cfg
        start = cfg.anneal_start_fraction * total_steps
        interval = (cfg.anneal_end_fraction - cfg.anneal_start_fraction) * total_steps / cfg.p_updates
        if step < start or interval <= 0:
            return float(cfg.p_start)
        j = min(cfg.p_updates, int((step - start) // interval) + 1)
        return float(cfg.p_start + (cfg.p_end - cfg.p_start) * j / cfg.p_updates)

    def lp_term(self, acts: torch.Tensor, weights, ctx: StepContext, coefficient: float) -> torch.Tensor:
        weighted = acts * weights
        target = self.scheduled_p(ctx.step, ctx.total_steps)
        if self.training and abs(target - float(self.p)) > 1e-12:
            with torch.no_grad():  # keep lambda * P_p(f) unchanged on this batch across the switch
                old, new = lp_penalty(weighted, float(self.p)), lp_penalty(weighted, target)
                if new > 0:
                    self.coefficient_scale.mul_(old / new)
                self.p.fill_(target)
        return coefficient * ctx.sparsity_scale * self.coefficient_scale * lp_penalty(weighted, float(self.p))


@register
class PAnnealReLUSAE(LpAnnealing, ReLUSAE):
    architecture = "relu_panneal"
    Config = PAnnealConfig
    sweep_parameter = "l1_coefficient"
    sweep_kind = "coefficient"

    def __init__(self, cfg: PAnnealConfig):
        super().__init__(cfg)
        self._init_lp_annealing()

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        f = self.encode(x)
        x_hat = self.decode(f)
        lp = self.lp_term(f, self.sparsity_weights(), ctx, self.cfg.l1_coefficient)
        return TrainOutput(x_hat, f, {"mse": mse_per_token(x_hat, ctx.target_for(x)), "lp": lp})

    # Inference is a plain ReLU SAE, so the file is SAELens' 'standard' one; the schedule is training state.
    def saved_architecture(self) -> str:
        return "relu"

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = super().saved_state()
        state.pop("p")
        state.pop("coefficient_scale")
        return state

    def load_saved_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {**tensors, "p": self.p.clone(), "coefficient_scale": self.coefficient_scale.clone()}
        super().load_saved_state(tensors)
