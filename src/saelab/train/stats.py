"""Dead and dense latent tracking, counted in tokens (not steps), so it is batch-size independent.

A latent is **dead** when it has not fired for `dead_after_tokens` tokens (the classic rule), or
when, over a window of about the last `dead_after_tokens` tokens, its firing frequency was below
`dead_below_relative` times the mean latent's frequency (L0 / d_sae over the same window), once
it has been watched for a whole window since it was born or revived. The second rule catches
*zombies*: latents that fire just often enough to reset a "tokens since fired" counter, and so
would never get a revival signal (AuxK, resampling) although they carry almost nothing. Being
relative, one default suits a toy world (L0 5 of 512 latents: dead below about 1e-4) and a wide
SAE on a model (L0 64 of 65536: dead below about 1e-5). `dead_below_relative` 0 is the classic
rule alone.

The window slides in `WINDOW_BUCKETS` buckets of `dead_after_tokens / WINDOW_BUCKETS` tokens
each, so memory is a fixed `(WINDOW_BUCKETS + 1) x d_sae` counts whatever the window length;
frequencies are over the complete buckets plus the one being filled: at least one window (more
when one batch is larger than a bucket, since a batch is never split).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saelab.errors import FileFormatError

WINDOW_BUCKETS = 8


class LatentStats:
    """`reduce` (optional) sums a tensor of counts over data-parallel ranks, so every rank
    counts the combined batch and agrees on which latents are dead."""

    def __init__(
        self,
        d_sae: int,
        dead_after_tokens: int,
        dense_threshold: float,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dead_below_relative: float = 0.0,
    ):
        self.reduce = reduce
        self.dead_after_tokens = dead_after_tokens
        self.dense_threshold = dense_threshold
        self.dead_below_relative = dead_below_relative
        self.bucket_tokens_target = max(1, -(-dead_after_tokens // WINDOW_BUCKETS))
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.tokens_seen = torch.zeros((), dtype=torch.int64)
        # the sliding window: per-bucket fire counts and token counts, and the bucket being filled
        self.window_fires = torch.zeros(WINDOW_BUCKETS + 1, d_sae, dtype=torch.int64)
        self.window_tokens = torch.zeros(WINDOW_BUCKETS + 1, dtype=torch.int64)
        self.window_pos = torch.zeros((), dtype=torch.int64)
        # tokens each latent has been watched since it was born or last revived
        self.age = torch.zeros(d_sae, dtype=torch.int64)

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
        self.age += n_tokens
        pos = int(self.window_pos)
        self.window_fires[pos] += fired
        self.window_tokens[pos] += n_tokens
        if int(self.window_tokens[pos]) >= self.bucket_tokens_target:  # start the next bucket
            pos = (pos + 1) % (WINDOW_BUCKETS + 1)
            self.window_fires[pos] = 0
            self.window_tokens[pos] = 0
            self.window_pos.fill_(pos)

    def window_fractions(self) -> torch.Tensor:
        """[d_sae] fraction of the window's tokens each latent fired on."""
        return self.window_fires.sum(0).double() / max(int(self.window_tokens.sum()), 1)

    def dead_mask(self) -> torch.Tensor:
        dead = self.tokens_since_fired >= self.dead_after_tokens
        if self.dead_below_relative > 0:
            freq = self.window_fractions()
            rare = freq < self.dead_below_relative * freq.mean()
            dead = dead | (rare & (self.age >= self.dead_after_tokens))
        return dead

    @torch.no_grad()
    def reset(self, latents: torch.Tensor) -> None:
        """Forget the history of `latents` (indices or a bool mask): they were just revived, and
        get a whole window before they can count as dead again."""
        self.tokens_since_fired[latents] = 0
        self.age[latents] = 0
        self.window_fires[:, latents] = 0

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
            "window_fires": self.window_fires.clone(),
            "window_tokens": self.window_tokens.clone(),
            "window_pos": self.window_pos.clone(),
            "age": self.age.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Also reads checkpoints written before the sliding window existed: their window starts
        empty and every latent's age at 0 (the classic rule, whose counter they hold, applies at
        once; the frequency rule after one window of the resumed run)."""
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.fire_count = state["fire_count"].clone()
        self.tokens_seen = state["tokens_seen"].clone()
        if "window_fires" not in state:
            self.window_fires.zero_()
            self.window_tokens.zero_()
            self.window_pos.zero_()
            self.age.zero_()
            return
        if state["window_fires"].shape != self.window_fires.shape:
            raise FileFormatError(
                f"the checkpoint's dead-latent window has shape {tuple(state['window_fires'].shape)}, "
                f"not {tuple(self.window_fires.shape)}; it was written by another saelab version or d_sae"
            )
        self.window_fires = state["window_fires"].clone()
        self.window_tokens = state["window_tokens"].clone()
        self.window_pos = state["window_pos"].clone()
        self.age = state["age"].clone()
