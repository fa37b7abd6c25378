"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, arXiv 2503.17547; Nabeshima, AF 2024).

A BatchTopK encoder whose latents are ordered into nested prefixes m_1 < ... < m_G = d_sae. Every
prefix must reconstruct x on its own:
    L = sum_g w_g ||x - (b_dec + sum_{i <= m_g} f_i d_i)||^2 + AuxK,
so early latents are pushed to carry general (parent) concepts and later ones only refine them,
which reduces feature absorption. `random_prefixes` is Nabeshima's variant: fresh prefix lengths
are sampled at every step instead of a fixed list. Inference is BatchTopK's global threshold, so
the file is SAELens' JumpReLU (as for BatchTopK).
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from saelab.sae.base import StepContext, TrainOutput, mse_per_token
from saelab.sae.registry import register
from saelab.sae.sparse import Selection, sparse_decode
from saelab.sae.topk import BatchTopKConfig, BatchTopKSAE, auxk_loss, selected_latents


def default_prefixes(d_sae: int, levels: int = 4) -> list[int]:
    """Doubling prefixes ending at d_sae, e.g. 256 -> [32, 64, 128, 256]."""
    sizes = sorted({max(1, d_sae >> i) for i in range(levels)})
    return sizes


class MatryoshkaConfig(BatchTopKConfig):
    architecture: str = "matryoshka"
    prefixes: list[PositiveInt] | None = Field(
        None, description="Nested prefix sizes m_1 < ... < m_G = d_sae (default: doubling, 4 levels)."
    )
    level_weights: list[NonNegativeFloat] | None = Field(
        None,
        description="Loss weight per prefix (default 1 each: the paper sums the prefix losses; "
        "Chanin et al.'s 'balance' sets these).",
    )
    random_prefixes: bool = Field(False, description="Sample prefix lengths every step (Nabeshima's variant).")
    n_random_prefixes: PositiveInt = Field(
        4, description="Prefixes per step in the random variant (the last is always d_sae)."
    )
    random_prefix_exponent: float = Field(
        1.0, gt=0, description="Random variant: P(m) proportional to m^-exponent, favouring short prefixes."
    )

    @model_validator(mode="after")
    def _check_prefixes(self):
        if self.prefixes is not None:
            p = self.prefixes
            if any(b <= a for a, b in zip(p, p[1:])):
                raise ValueError(f"prefixes must be strictly increasing (got {p}); e.g. [32, 64, 128, {self.d_sae}]")
            if p[-1] != self.d_sae:
                raise ValueError(f"prefixes must end at d_sae={self.d_sae} (got {p}); append {self.d_sae}")
        if self.level_weights is not None:
            n = len(self.resolved_prefixes) if not self.random_prefixes else self.n_random_prefixes
            if len(self.level_weights) != n:
                raise ValueError(
                    f"level_weights has {len(self.level_weights)} entries but there are {n} prefixes; give one per prefix"
                )
            if sum(self.level_weights) <= 0:
                raise ValueError("level_weights must not all be zero")
        if self.random_prefixes and self.n_random_prefixes > self.d_sae:
            raise ValueError(f"n_random_prefixes={self.n_random_prefixes} exceeds d_sae={self.d_sae}")
        return self

    @property
    def resolved_prefixes(self) -> list[int]:
        return list(self.prefixes) if self.prefixes is not None else default_prefixes(self.d_sae)


@register
class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    Config = MatryoshkaConfig
    sweep_parameter = "k"
    sweep_kind = "count"
    transcodes = True
    crosscodes = True
    resamples_dead = True

    def sample_prefixes(self) -> list[int]:
        """Nabeshima's random prefixes: n-1 distinct lengths in [1, d_sae) from a power law, plus d_sae.
        Uses torch's global RNG, which the trainer seeds and checkpoints."""
        cfg = self.cfg
        m = torch.arange(1, cfg.d_sae, dtype=torch.float64)
        probs = m.pow(-cfg.random_prefix_exponent)
        n = min(cfg.n_random_prefixes - 1, cfg.d_sae - 1)
        picks = torch.multinomial(probs, n, replacement=False) + 1 if n > 0 else torch.empty(0, dtype=torch.long)
        return sorted(int(v) for v in picks) + [cfg.d_sae]

    @classmethod
    def config_from_saved(cls, saved_cfg: dict, values: dict) -> dict:
        """k and the prefixes of a SAELens `matryoshka_batchtopk` training checkpoint."""
        out = super().config_from_saved(saved_cfg, values)
        widths = saved_cfg.get("matryoshka_widths")
        if widths:
            out["prefixes"] = [int(w) for w in widths]
            out["level_weights"] = None  # SAELens sums the level losses with equal weight
        return out

    def level_weights(self, n: int) -> list[float]:
        w = self.cfg.level_weights
        return list(w) if w is not None else [1.0] * n

    def nested_reconstructions(
        self, f: torch.Tensor, prefixes: list[int], sel: Selection | None = None
    ) -> list[torch.Tensor]:
        """b_dec + sum_{i <= m_g} f_i d_i for every prefix, built incrementally (one pass over W_dec).

        `f` is the dense [B, d_sae] latents, or the values at `sel` (then each level decodes
        only its own selected entries)."""
        n_rows = f.shape[0] if sel is None else sel.n_rows
        out, acc, start = [], self.b_dec.expand(n_rows, -1), 0
        for end in prefixes:
            if sel is None:
                part = f[:, start:end] @ self.W_dec[start:end]
            else:
                part = sparse_decode(sel, f * ((sel.cols >= start) & (sel.cols < end)), self.W_dec)
            acc = acc + part
            out.append(acc)
            start = end
        return out

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.training_pre_acts(x)
        f, sel, acts = selected_latents(self, x, pre, self.select(pre))
        prefixes = self.sample_prefixes() if self.cfg.random_prefixes else self.cfg.resolved_prefixes
        recons = self.nested_reconstructions(f, prefixes, sel)
        weights = self.level_weights(len(prefixes))
        # The full-width term is named "mse" (what logs and contracts read); shorter prefixes add theirs.
        losses = {"mse": weights[-1] * mse_per_token(recons[-1], ctx.target_for(x))}
        for g, (m, w, r) in enumerate(zip(prefixes[:-1], weights[:-1], recons[:-1])):
            name = f"mse_level_{g}" if self.cfg.random_prefixes else f"mse_prefix_{m}"
            losses[name] = w * mse_per_token(r, ctx.target_for(x))
        x_hat = recons[-1]
        losses["auxk"] = auxk_loss(self, pre, x, x_hat, ctx)
        return TrainOutput(x_hat, acts, losses)
