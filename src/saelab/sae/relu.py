"""ReLU / L1 SAE (Cunningham et al. 2023; Bricken et al. 2023; Anthropic's April-2024 update).

Loss: ||x - x_hat||^2 + lambda * sum_i f_i * w_i, where w_i = ||d_i|| in 'penalty' mode (decoder
free) or 1 in 'unit' mode (decoder rows renormalised, parallel gradient removed).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat

from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.sparse import SparseActs, gather_weights, sparse_selection
from saelab.sae.target_l0 import TargetL0


class ReLUConfig(SAEConfig):
    architecture: str = "relu"
    decoder_norm: Literal["unit", "penalty"] = Field("penalty", description="See SAEConfig.decoder_norm.")
    l1_coefficient: NonNegativeFloat = Field(3.0, description="lambda on the (decoder-norm-weighted) L1 penalty.")
    target_l0: PositiveFloat | None = Field(
        None,
        description="Train to this L0: l1_coefficient is then only the starting value, adapted every "
        "step after the sparsity warm-up (logged as l1_coefficient).",
    )


@register
class ReLUSAE(TargetL0, SAE):
    architecture = "relu"
    Config = ReLUConfig
    sweep_parameter = "l1_coefficient"
    sweep_kind = "coefficient"
    transcodes = True
    crosscodes = True
    resamples_dead = True
    coefficient_field = "l1_coefficient"

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        self.init_target_l0()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.training_pre_acts(x)
        sel = sparse_selection(pre > 0)
        if sel is not None:  # positive pre-activations only: the ReLU is the identity there
            f = self.preacts_with_grad(pre, x, sel)
            x_hat = self.decode_selected(sel, f)
            l1 = (f * gather_weights(self.sparsity_weights(), sel)).sum() / x.shape[0]
            acts = SparseActs(sel, f.detach())
            l0 = sel.cols.numel() / x.shape[0]
        else:
            f = torch.relu(self.preacts_with_grad(pre, x))
            x_hat = self.decode(f)
            l1 = (f * self.sparsity_weights()).sum(-1).mean()
            acts = f
            l0 = (f > 0).sum() / x.shape[0]
        return TrainOutput(
            x_hat,
            acts,
            {"mse": mse_per_token(x_hat, ctx.target_for(x)), "l1": self.sparsity_coefficient(ctx, l0) * l1},
        )
