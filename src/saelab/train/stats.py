"""Dead and dense latent tracking, counted in tokens (not steps), so it is batch-size independent."""

from __future__ import annotations

import torch


class LatentStats:
    def __init__(self, d_sae: int, dead_after_tokens: int, dense_threshold: float):
        self.dead_after_tokens = dead_after_tokens
        self.dense_threshold = dense_threshold
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.tokens_seen = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """`fired[i]`: how many of the batch's `n_tokens` rows latent i fired on."""
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
