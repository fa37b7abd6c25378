"""Switch SAE (Mudide, Engels, Michaud, Tegmark, Schroeder de Witt 2024, arXiv 2410.08201).

N expert TopK SAEs of width m = d_sae / N share b_dec. A router p(x) = softmax((x - b_router) W_router)
sends each token to e* = argmax p, and x_hat = b_dec + p_{e*}(x) * W_dec[e*] TopK(W_enc[e*] (x - b_dec)).
Scaling by the router probability gives the router a gradient; a Switch-Transformer load-balancing
loss alpha * N * sum_e f_e P_e (f_e: fraction of tokens routed to e, P_e: mean router probability)
keeps the experts in use, and a router z-loss beta * mean(logsumexp(logits)^2) (ST-MoE, Zoph et al.
2022) keeps the router's logits small: a saturated softmax gives the load-balancing term no
gradient, and the router then collapses onto one expert. Both coefficients are relative to the
reconstruction term's scale: saelab's MSE is summed over d_in on inputs scaled to E||x||^2 ~ d_in,
so each term is multiplied by d_in. The default alpha = 0.1 is the smallest of (0.01, 0.03, 0.1)
that kept four experts balanced on a Zipf-rate toy world (busiest expert 0.25-0.29 of tokens, two
seeds; 0.01 left one expert idle and another at 0.47-0.50, and without the d_in scaling and the
z-loss one expert took every token, with a mean top router probability of 0.99). Each token touches only its expert's m columns, so encoder compute
scales with the expert size, not the total width.

Latents live in one [d_sae] vector (expert e owns columns e*m .. (e+1)*m) and already include the
router scale, so decode is the ordinary f @ W_dec + b_dec and every metric applies unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from saelab.sae.base import SAE, StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.topk import TopKConfig, auxk_loss


class SwitchConfig(TopKConfig):
    architecture: str = "switch"
    resample_dead: Literal[False] = Field(False, description="Not available here (no resampling).")
    n_experts: PositiveInt = Field(4, description="Number of experts N; must divide d_sae.")
    load_balance_coefficient: NonNegativeFloat = Field(
        0.1,
        description="alpha on the load-balancing loss d_in * alpha * N * sum_e f_e P_e (d_in * alpha when balanced).",
    )
    router_z_coefficient: NonNegativeFloat = Field(
        1e-3, description="beta on the router z-loss d_in * beta * mean(logsumexp(router logits)^2)."
    )

    @model_validator(mode="after")
    def _experts_fit(self):
        if self.d_sae % self.n_experts:
            raise ValueError(
                f"n_experts={self.n_experts} does not divide d_sae={self.d_sae}; choose d_sae a multiple of n_experts"
            )
        if self.k > self.d_sae // self.n_experts:
            raise ValueError(
                f"k={self.k} exceeds the expert width d_sae/n_experts={self.d_sae // self.n_experts}; lower k or n_experts"
            )
        return self

    @property
    def expert_size(self) -> int:
        return self.d_sae // self.n_experts


@register
class SwitchSAE(SAE):
    architecture = "switch"
    Config = SwitchConfig
    sweep_parameter = "k"
    sweep_kind = "count"

    def __init__(self, cfg: SwitchConfig):
        super().__init__(cfg)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.W_router = torch.nn.Parameter(torch.randn(cfg.d_in, cfg.n_experts, generator=gen) / cfg.d_in**0.5)
        self.b_router = torch.nn.Parameter(torch.zeros(cfg.d_in))

    # ------------------------------------------------------------------ routing
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_router) @ self.W_router

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.router_logits(x), dim=-1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents [B, d_sae] scaled by the router prob, expert [B], router probs [B, N], logits [B, N])."""
        self._check_input(x)
        logits = self.router_logits(x)
        probs = torch.softmax(logits, dim=-1)
        top_p, expert = probs.max(dim=-1)
        xc = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        m, k = self.cfg.expert_size, self.cfg.k
        W = self.W_enc.view(self.cfg.d_in, self.cfg.n_experts, m)
        b = self.b_enc.view(self.cfg.n_experts, m)
        order = torch.argsort(expert)  # tokens grouped by expert: one slice (no mask) per expert
        counts = torch.bincount(expert, minlength=self.cfg.n_experts).tolist()
        rows_all, cols_all, vals_all, start = [], [], [], 0
        for e, count in enumerate(counts):  # each token runs only its own expert's encoder
            if count == 0:
                continue
            rows = order[start : start + count]
            start += count
            pre = xc.index_select(0, rows) @ W[:, e] + b[e]
            top, idx = pre.topk(k, dim=-1, sorted=False)
            rows_all.append(rows[:, None].expand(-1, k))
            cols_all.append(idx + e * m)
            vals_all.append(torch.relu(top) * top_p.index_select(0, rows)[:, None])
        f = xc.new_zeros(x.shape[0], self.cfg.d_sae)
        if rows_all:  # one scatter for all experts, so the cost does not grow with N * B * d_sae
            f = f.index_put(
                (torch.cat(rows_all).flatten(), torch.cat(cols_all).flatten()), torch.cat(vals_all).flatten()
            )
        return f, expert, probs, logits

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x)[0]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations of every expert (for analysis; routing uses only one)."""
        return super().pre_acts(x)

    # ------------------------------------------------------------------ training
    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        f, expert, probs, logits = self.route(x)
        x_hat = self.decode(f)
        n, scale = self.cfg.n_experts, self.cfg.d_in  # the MSE's scale (see the module docstring)
        frac = torch.bincount(expert, minlength=n).to(probs.dtype) / x.shape[0]
        balance = scale * self.cfg.load_balance_coefficient * n * (frac * probs.mean(0)).sum()
        z_loss = scale * self.cfg.router_z_coefficient * torch.logsumexp(logits, dim=-1).pow(2).mean()
        losses = {"mse": mse_per_token(x_hat, ctx.target_for(x)), "load_balance": balance, "router_z": z_loss}
        # AuxK over the dead latents of each token's own expert (dead latents elsewhere cost it no compute).
        if ctx.dead_mask is not None and ctx.dead_mask.any():
            own = torch.zeros_like(f, dtype=torch.bool).view(-1, n, self.cfg.expert_size)
            own[torch.arange(x.shape[0]), expert] = True
            pre = torch.where(own.view_as(f), super().pre_acts(x), torch.full_like(f, float("-inf")))
            losses["auxk"] = auxk_loss(self, pre, x, x_hat, ctx).nan_to_num(0.0)
        else:
            losses["auxk"] = x.new_zeros(())
        return TrainOutput(x_hat, f, losses)

    # ------------------------------------------------------------------ reports
    @torch.no_grad()
    def expert_utilisation(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of tokens routed to each expert [N]."""
        expert = self.router_probs(x).argmax(-1)
        return torch.bincount(expert, minlength=self.cfg.n_experts).float() / x.shape[0]

    def flops_per_token(self) -> dict[str, int]:
        """Multiply-adds x2 per token: router, the one expert's encoder, and the k-row sparse decoder."""
        d, n, m, k = self.cfg.d_in, self.cfg.n_experts, self.cfg.expert_size, self.cfg.k
        router, encoder, decoder = 2 * d * n, 2 * d * m, 2 * k * d
        return {
            "router": router,
            "encoder": encoder,
            "decoder": decoder,
            "total": router + encoder + decoder,
            "dense_topk_encoder": 2 * d * self.cfg.d_sae,
        }

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.W_router *= scale  # (x s - b_r) W_r = (x - b_r / s)(s W_r)
        self.b_router /= scale
