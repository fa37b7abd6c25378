"""A target L0 instead of a sparsity coefficient, for the penalty families (ReLU, Gated, JumpReLU).

With `target_l0` set, the sparsity coefficient the config names is only the starting value: after
the sparsity warm-up, every step multiplies it by `(L0 / target_l0) ** TARGET_L0_GAIN`, L0 being
the batch's mean number of active latents. That is integral control on log(coefficient): while
L0 is above the target the penalty keeps growing, below it keeps shrinking, and it stops moving
once L0 sits at the target. The gain is small because L0 follows the coefficient with a lag (the
encoder and biases move at Adam's pace); with gain 0.05 an L0 twice the target doubles the
coefficient in about 20 steps (JumpReLU's thresholds follow the coefficient at once, see
`JumpReLUSAE.coefficient_changed`). The multiplier is a buffer (`target_l0_scale`), checkpointed
with the weights so a resumed run continues exactly, logged as the effective coefficient, and
left out of saved files (inference does not use it).
"""

from __future__ import annotations

import math

import torch

from saelab.errors import ConfigError
from saelab.sae.base import StepContext

TARGET_L0_GAIN = 0.05
_SCALE_RANGE = (1e-6, 1e6)


class TargetL0:
    """Mixin: `sparsity_coefficient` gives the coefficient to use this step and adapts it."""

    coefficient_field: str = ""  # the config field holding the (starting) coefficient

    @classmethod
    def trains_to_target_l0(cls) -> bool:
        """Whether the class takes a `target_l0`: a subclass with its own loss (p-annealing, MDL)
        must declare `coefficient_field` itself; else a target is refused, not ignored."""
        return "coefficient_field" in vars(cls) and "target_l0" in cls.Config.model_fields

    def init_target_l0(self) -> None:
        """Call from `__init__` (see `trains_to_target_l0`)."""
        if self.cfg.target_l0 is not None:
            if not self.trains_to_target_l0():
                raise ConfigError(
                    f"architecture '{self.architecture}' cannot train to a target_l0 (its loss does not use "
                    f"{self.coefficient_field}); drop target_l0"
                )
            self.register_buffer("target_l0_scale", torch.tensor(1.0, dtype=torch.float64))

    def effective_coefficient(self) -> float:
        scale = float(self.target_l0_scale) if self.cfg.target_l0 is not None else 1.0
        return getattr(self.cfg, self.coefficient_field) * scale

    @torch.no_grad()
    def sparsity_coefficient(self, ctx: StepContext, l0: torch.Tensor | float) -> float:
        """The coefficient times the warm-up factor for this step; with a target, first move the
        multiplier by this batch's L0 (once the warm-up is over, so it does not fight it)."""
        if self.cfg.target_l0 is not None and ctx.sparsity_scale >= 1.0 and self.training:
            # one batch moves the coefficient by at most 2^gain (3.5%): an L0 spike (a revival)
            # must not wind it up
            ratio = min(max(max(float(l0), 1e-3) / self.cfg.target_l0, 0.5), 2.0)
            old = float(self.target_l0_scale)
            new = min(max(old * math.exp(TARGET_L0_GAIN * math.log(ratio)), _SCALE_RANGE[0]), _SCALE_RANGE[1])
            self.target_l0_scale.fill_(new)
            self.coefficient_changed(new / old)
        return self.effective_coefficient() * ctx.sparsity_scale

    def coefficient_changed(self, factor: float) -> None:
        """The controller just multiplied the coefficient by `factor`; an architecture whose
        equilibrium moves with it at once (JumpReLU's thresholds) follows here. Default: nothing."""

    def training_metrics(self) -> dict[str, float]:
        out = super().training_metrics()
        if self.cfg.target_l0 is not None:
            out[self.coefficient_field] = self.effective_coefficient()
        return out

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = super().saved_state()
        state.pop("target_l0_scale", None)
        return state

    def load_saved_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.cfg.target_l0 is not None and "target_l0_scale" not in tensors:
            tensors = {**tensors, "target_l0_scale": torch.tensor(1.0, dtype=torch.float64)}
        super().load_saved_state(tensors)
