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

from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt

from saelab.sae.base import SAE, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.topk import TopKConfig, auxk_loss


class MatchingPursuitConfig(TopKConfig):
    """TopK's settings (k, AuxK), with k read as the number of pursuit steps."""

    architecture: str = "matching_pursuit"
    resample_dead: Literal[False] = Field(False, description="Not available here (no resampling).")
    k: PositiveInt = Field(8, description="Pursuit steps per token (at most k active latents).")
    residual_threshold: NonNegativeFloat = Field(
        0.0, description="Stop a token's pursuit once its residual norm is below this (0: never)."
    )
    stop_on_duplicate_support: bool = Field(
        False, description="Stop a token's pursuit once a step adds no new atom (SAELens' default rule)."
    )


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
        stops = self.cfg.stop_on_duplicate_support or self.cfg.residual_threshold > 0
        running = torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
        support = torch.zeros_like(f, dtype=torch.bool) if self.cfg.stop_on_duplicate_support else None
        for _ in range(self.cfg.k):
            scores = (r @ self.W_dec.t()) / norms  # projection length onto each unit atom
            best, j = scores.max(dim=-1)
            coef = torch.relu(best) / norms[j]  # <r, d_j> / ||d_j||^2; stop (0) when nothing correlates positively
            if stops:
                coef = coef * running
            f = f.index_put((rows, j), coef, accumulate=True)
            r = r - coef[:, None] * self.W_dec[j]
            if support is not None:  # the step that re-picks an atom still counts, then the token stops
                new_support = f != 0
                running = running & (new_support != support).any(dim=1)
                support = new_support
            if self.cfg.residual_threshold > 0:
                running = running & (r.norm(dim=-1) >= self.cfg.residual_threshold)
            if stops and not running.any():
                break
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
        self.cfg.residual_threshold /= scale  # compared with residual norms, in input units

    def saved_config_extras(self) -> dict:
        """SAELens' matching-pursuit keys: the same pursuit for unit-norm atoms."""
        return {
            "residual_threshold": self.cfg.residual_threshold,
            "max_iterations": self.cfg.k,
            "stop_on_duplicate_support": self.cfg.stop_on_duplicate_support,
        }

    @classmethod
    def config_from_saved(cls, saved_cfg: dict, values: dict) -> dict:
        if "max_iterations" not in saved_cfg:  # a saelab file from before these keys: keep its own config
            return {}
        return {
            "k": int(saved_cfg["max_iterations"] or values["d_in"]),  # SAELens' default bound is d_in
            "residual_threshold": float(saved_cfg.get("residual_threshold", 0.0)),
            "stop_on_duplicate_support": bool(saved_cfg.get("stop_on_duplicate_support", False)),
        }
