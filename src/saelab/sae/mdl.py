"""MDL-SAE (Ayonrinde, Pearce, Sharkey 2024, arXiv 2410.11179): the SAE as a lossy code.

An SAE's description length per token is the bits to say which latents fire plus the bits for
their quantised values: DL = sum_i H_b(p_i) + L0 * b, where p_i is latent i's firing probability
(an entropy code for the active set, H_b the binary entropy) and b the bits per value. The MDL
principle picks, among SAEs within a distortion bound, the one with the shortest description,
rather than the sparsest or widest one.

As a training objective (`mdl`): a JumpReLU SAE trained on ||x - x_hat||^2 + lambda * DL, with
p_i the batch firing rate and L0 both made differentiable by the JumpReLU straight-through
pseudo-derivatives (the distortion bound enters as the Lagrangian trade-off lambda). Its inference
is a JumpReLU, so it is saved as one. The evaluator that ranks trained SAEs under a bound is
`saelab.evals.mdl`.
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from saelab.sae.base import StepContext, TrainOutput, mse_per_token
from saelab.sae.jumprelu import JumpReLUConfig, JumpReLUSAE, jumprelu, step
from saelab.sae.registry import register


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """H_b(p) in bits, 0 at p in {0, 1}, with a finite gradient everywhere."""
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


class MDLConfig(JumpReLUConfig):
    architecture: str = "mdl"
    dl_coefficient: NonNegativeFloat = Field(0.05, description="lambda on the description length (bits per token).")
    value_bits: PositiveFloat = Field(8.0, description="b: bits per active latent's quantised value.")
    l0_coefficient: NonNegativeFloat = Field(
        0.0, description="Unused by MDL (the DL replaces the L0 penalty); must be 0."
    )

    @model_validator(mode="after")
    def _no_l0(self):
        if self.l0_coefficient != 0:
            raise ValueError(
                f"l0_coefficient={self.l0_coefficient} has no effect on an MDL SAE (the description length "
                "replaces the L0 penalty); set dl_coefficient instead"
            )
        return self


@register
class MDLSAE(JumpReLUSAE):
    architecture = "mdl"
    Config = MDLConfig
    sweep_parameter = "dl_coefficient"
    sweep_kind = "coefficient"

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.pre_acts(x)
        threshold = self.threshold
        f = jumprelu(pre, threshold, self.cfg.bandwidth)
        x_hat = self.decode(f)
        fires = step(pre, threshold, self.cfg.bandwidth)  # [B, d_sae] with pseudo-gradients to theta
        position_bits = binary_entropy_bits(fires.mean(0)).sum()
        value_bits = self.cfg.value_bits * fires.sum(-1).mean()
        scale = self.cfg.dl_coefficient * ctx.sparsity_scale
        return TrainOutput(
            x_hat,
            f,
            {
                "mse": mse_per_token(x_hat, ctx.target_for(x)),
                "dl_positions": scale * position_bits,
                "dl_values": scale * value_bits,
            },
        )

    def saved_architecture(self) -> str:
        return "jumprelu"  # inference is a JumpReLU; SAELens loads it as one
