"""Matching-pursuit SAE (MP-SAE; Costa, Fel, Lubana et al. 2025, "From flat to hierarchical").

The encoder is not one linear map but k greedy steps of matching pursuit on the decoder's own
atoms: starting from r = x - b_dec, pick the atom with the largest (norm-scaled) positive inner
product with r, add its coefficient <r, d_j>/||d_j||^2 to f_j and subtract its contribution from r.
Because each step explains away what earlier atoms already reconstruct, correlated or nested
features can be picked in sequence rather than competing in one shot. Training backpropagates
through the unrolled pursuit into W_dec; AuxK gives dead atoms a gradient. The encoder is tied
to the decoder, so `W_enc` is W_dec^T (a view, not a parameter).
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt

from saelab.sae.base import SAE, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.topk import TopKConfig, auxk_loss


class MatchingPursuitConfig(TopKConfig):
    """TopK's settings (k, AuxK), with k read as the number of pursuit steps."""

    architecture: str = "matching_pursuit"
    k: PositiveInt = Field(8, description="Pursuit steps per token (at most k active latents).")


@register
class MatchingPursuitSAE(SAE):
    architecture = "matching_pursuit"
    Config = MatchingPursuitConfig
    sweep_parameter = "k"
    sweep_kind = "count"

    def __init__(self, cfg: MatchingPursuitConfig):
        super().__init__(cfg)
        del self.W_enc, self.b_enc  # the pursuit uses the decoder atoms themselves
        self._tied = True

    def __getattr__(self, name: str):
        # W_enc reads as W_dec^T (metrics use encoder directions); a plain attribute, not a parameter.
        if name == "W_enc" and self.__dict__.get("_tied"):
            return self.W_dec.t()
        return super().__getattr__(name)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Inner products of the centred input with each atom (the pursuit's first scores)."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_dec.t()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        r = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        f = r.new_zeros(r.shape[0], self.cfg.d_sae)
        rows = torch.arange(r.shape[0], device=r.device)
        for _ in range(self.cfg.k):
            scores = (r @ self.W_dec.t()) / norms  # projection length onto each unit atom
            best, j = scores.max(dim=-1)
            coef = torch.relu(best) / norms[j]  # <r, d_j> / ||d_j||^2; stop (0) when nothing correlates positively
            f = f.index_put((rows, j), coef, accumulate=True)
            r = r - coef[:, None] * self.W_dec[j]
        return f

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        f = self.encode(x)
        x_hat = self.decode(f)
        return TrainOutput(
            x_hat,
            f,
            {"mse": mse_per_token(x_hat, ctx.target_for(x)), "auxk": auxk_loss(self, self.pre_acts(x), x, x_hat, ctx)},
        )

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        # Coefficients are normalised by atom norms, so scaling atoms by 1/s scales codes of x/s back.
        self.W_dec /= scale
        self.b_dec /= scale
