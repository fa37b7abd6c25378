"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014).

A gate path decides which latents fire, a magnitude path how large they are; the two share
W_enc up to a per-latent rescaling, W_mag = exp(r_mag) * W_gate. The L1 penalty acts only on
the gate, and an auxiliary loss reconstructs x from ReLU(pi_gate) through a frozen copy of the
decoder, so the gate gets a reconstruction signal without pulling the decoder.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat

from saelab.sae.base import SAE, SAEConfig, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.sparse import SparseActs, gather_weights, sparse_decode, sparse_selection
from saelab.sae.target_l0 import TargetL0


class GatedConfig(SAEConfig):
    architecture: str = "gated"
    # Unit-norm rows: with free rows the gate can dodge its L1 by shrinking the decoder while
    # r_mag grows to compensate (seen on toy worlds as L0 in the hundreds).
    decoder_norm: Literal["unit", "penalty"] = Field("unit", description="See SAEConfig.decoder_norm.")
    l1_coefficient: NonNegativeFloat = Field(5.0, description="lambda on the L1 of ReLU(pi_gate).")
    target_l0: PositiveFloat | None = Field(
        None,
        description="Train to this L0: l1_coefficient is then only the starting value, adapted every "
        "step after the sparsity warm-up (logged as l1_coefficient).",
    )


@register
class GatedSAE(TargetL0, SAE):
    architecture = "gated"
    Config = GatedConfig
    sweep_parameter = "l1_coefficient"
    sweep_kind = "coefficient"
    resamples_dead = True
    coefficient_field = "l1_coefficient"

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        del self.b_enc  # the gate and magnitude paths have their own biases
        self.b_gate = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.init_target_l0()

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pi_gate = self.pre_acts(x)
        # W_mag = exp(r_mag) * W_gate column-wise, so the magnitude path reuses the gate's matmul
        pi_mag = (pi_gate - self.b_gate) * self.r_mag.exp() + self.b_mag
        return pi_gate, pi_mag

    def latent_parameters(self) -> list[tuple[torch.nn.Parameter, int]]:
        return super().latent_parameters() + [(self.b_mag, 0), (self.r_mag, 0)]

    @torch.no_grad()
    def after_resample(self, latents: torch.Tensor, preact_on_row: torch.Tensor, rows: torch.Tensor) -> None:
        """The magnitude path starts as the gate's (W_mag = W_gate, same zero bias)."""
        self.b_mag[latents] = 0.0
        self.r_mag[latents] = 0.0

    def encoder_bias(self) -> torch.Tensor:
        """The gate pre-activations decide firing, so they play the role of pre-activations."""
        return self.b_gate

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return super().pre_acts(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre_gate = self.training_pre_acts(x)
        # Every term reads the gate only where it is open (pi_gate > 0): the sparse path keeps those.
        sel = sparse_selection(pre_gate > 0)
        pi_gate = self.preacts_with_grad(pre_gate, x, sel)
        b_gate, r_mag, b_mag = (p if sel is None else p[sel.flat_cols] for p in (self.b_gate, self.r_mag, self.b_mag))
        pi_mag = (pi_gate - b_gate) * r_mag.exp() + b_mag
        if sel is not None:
            f = torch.relu(pi_mag)
            x_hat = self.decode_selected(sel, f)
            gate_acts = pi_gate
            l1 = (gate_acts * gather_weights(self.sparsity_weights(), sel)).sum() / x.shape[0]
            x_hat_frozen = sparse_decode(sel, gate_acts, self.W_dec.detach()) + self.b_dec.detach()
            acts = SparseActs(sel, f.detach())
            l0 = sel.cols.numel() / x.shape[0]
        else:
            f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
            x_hat = self.decode(f)
            gate_acts = torch.relu(pi_gate)
            l1 = (gate_acts * self.sparsity_weights()).sum(-1).mean()
            x_hat_frozen = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
            acts = f
            l0 = (pi_gate > 0).sum() / x.shape[0]
        return TrainOutput(
            x_hat,
            acts,
            {
                "mse": mse_per_token(x_hat, ctx.target_for(x)),
                "l1": self.sparsity_coefficient(ctx, l0) * l1,
                "aux": mse_per_token(x_hat_frozen, ctx.target_for(x)),
            },
        )

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)  # W_mag = exp(r_mag) * W_enc scales with W_enc
