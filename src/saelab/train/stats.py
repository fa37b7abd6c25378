"""Dead and dense latent tracking, counted in tokens (not steps), so it is batch-size independent."""

from __future__ import annotations

from collections.abc import Callable

import torch


class LatentStats:
    """`reduce` (optional) sums a tensor of counts over data-parallel ranks, so every rank
    counts the combined batch and agrees on which latents are dead."""

    def __init__(
        self,
        d_sae: int,
        dead_after_tokens: int,
        dense_threshold: float,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.reduce = reduce
        self.dead_after_tokens = dead_after_tokens
        self.dense_threshold = dense_threshold
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.tokens_seen = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """`fired[i]`: how many of the batch's `n_tokens` rows latent i fired on."""
        if self.reduce is not None:  # one collective for both counts: [fired..., rows]
            counts = self.reduce(torch.cat([fired, fired.new_full((1,), n_tokens)]))
            fired, n_tokens = counts[:-1], int(counts[-1])
        fired = fired.cpu()
        self.tokens_seen += n_tokens
        self.fire_count += fired
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired > 0] = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    def frequencies(self) -> torch.Tensor:
        return self.fire_count.double() / max(int(self.tokens_seen), 1)

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def dense_fraction(self) -> float:
        return float((self.frequencies() > self.dense_threshold).float().mean())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "fire_count": self.fire_count.clone(),
            "tokens_seen": self.tokens_seen.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.fire_count = state["fire_count"].clone()
        self.tokens_seen = state["tokens_seen"].clone()
