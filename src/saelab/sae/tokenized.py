"""Tokenized SAE (Dooms & Wilhelm 2024, "Tokenized SAEs: Infusing per-token biases", arXiv 2502.17332).

A TopK SAE plus a per-token decoder bias: x_hat = W_dec f + b_dec + L[t], with L [vocab, d_in]
indexed by the current token id t. Much of a residual stream is a function of the current token
alone ("unigram" directions); the table takes it over, so latents are spent on context. L is
trained jointly and initialised from per-token mean activations (minus b_dec) via `init_from_data`.

Token ids come from the source's `Batch.tokens`. Without them (e.g. a toy world with no tokens),
every position uses one extra row, index `vocab_size`, initialised to the overall mean: the SAE
then behaves as TopK with a learned output bias, so it still trains, evaluates and saves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt

from saelab.errors import ConfigError
from saelab.sae.base import SAE, StepContext, TrainOutput
from saelab.sae.registry import register
from saelab.sae.sparse import Selection, select_topk
from saelab.sae.topk import TopKConfig, scatter_topk, selected_step


class TokenizedConfig(TopKConfig):
    architecture: str = "tokenized"
    resample_dead: Literal[False] = Field(False, description="Not available here (no resampling).")
    vocab_size: PositiveInt = Field(1024, description="Rows of the per-token bias table (token ids 0..vocab_size-1).")


@register
class TokenizedSAE(SAE):
    architecture = "tokenized"
    Config = TokenizedConfig
    sweep_parameter = "k"
    sweep_kind = "count"
    uses_tokens = True

    def __init__(self, cfg: TokenizedConfig):
        super().__init__(cfg)
        # Last row: the bias used when no token ids are given.
        self.W_lookup = torch.nn.Parameter(torch.zeros(cfg.vocab_size + 1, cfg.d_in))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return scatter_topk(pre, self.cfg.k)

    def token_index(self, tokens: torch.Tensor | None, n: int) -> torch.Tensor:
        """Row of the table for each of `n` positions; checks ids against the table."""
        if tokens is None:
            return torch.full((n,), self.cfg.vocab_size, dtype=torch.long, device=self.W_lookup.device)
        tokens = torch.as_tensor(tokens, device=self.W_lookup.device).reshape(-1).long()
        if tokens.numel() != n:
            raise ConfigError(f"got {tokens.numel()} token ids for {n} activations; pass one id per row of x")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)][:5].tolist()
            raise ConfigError(
                f"token ids {bad} are outside the table (vocab_size={self.cfg.vocab_size}); "
                "set vocab_size to the tokenizer's vocabulary size"
            )
        return tokens

    def decode(self, f: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec + self.W_lookup[self.token_index(tokens, f.shape[0])]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x), tokens)

    def decode_selected(self, sel: Selection, values: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return super().decode_selected(sel, values) + self.W_lookup[self.token_index(tokens, sel.n_rows)]

    def loss_terms(self, x: torch.Tensor, ctx: StepContext) -> TrainOutput:
        pre = self.training_pre_acts(x)
        return selected_step(self, x, pre, select_topk(pre, self.cfg.k), ctx)

    @torch.no_grad()
    def init_from_data(self, sample) -> None:
        """L[t] = mean(x | token t) - b_dec; tokens not in the sample (and the no-token row) get the overall mean."""
        x = sample.x
        mean = x.mean(0) - self.b_dec
        self.W_lookup.copy_(mean.expand_as(self.W_lookup))
        if sample.tokens is None:
            return
        t = self.token_index(sample.tokens, x.shape[0])
        counts = torch.bincount(t, minlength=self.cfg.vocab_size + 1).to(x.dtype)
        sums = torch.zeros_like(self.W_lookup).index_add_(0, t, x)
        seen = counts > 0
        self.W_lookup[seen] = sums[seen] / counts[seen, None] - self.b_dec

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.W_lookup /= scale
