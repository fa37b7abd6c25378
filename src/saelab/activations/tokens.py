"""Synthetic token ids with known per-token means, on top of any source.

Real residual streams carry a large component that depends only on the current token. This
wrapper reproduces that on a ground-truth world: each row gets a token id t (Zipf-distributed over
`vocab_size`) and x += token_means[t], with `token_means` known. Tokenized SAEs are tested on it;
the source spec is `{type: toy_tokens, world: {...}, vocab_size: 64, mean_norm: 1.0}`.
"""

from __future__ import annotations

import torch

from saelab.activations.base import Batch
from saelab.errors import ConfigError


class TokenMeanSource:
    """Wrap `base` (an ActivationSource): add a token id per row and that token's mean to x.
    `token_seed` fixes the means (part of the world); `seed` only the sampling of ids."""

    def __init__(
        self,
        base,
        vocab_size: int = 64,
        mean_norm: float = 1.0,
        zipf_exponent: float = 1.0,
        seed: int = 0,
        token_seed: int = 0,
    ):
        if vocab_size <= 0:
            raise ConfigError(f"vocab_size must be positive (got {vocab_size})")
        if mean_norm < 0:
            raise ConfigError(f"mean_norm must be >= 0 (got {mean_norm})")
        self.base = base
        self.vocab_size = vocab_size
        gen = torch.Generator().manual_seed(10_007 * (token_seed + 1))
        means = torch.randn(vocab_size, base.d_in, generator=gen)
        self.token_means = mean_norm * means / means.norm(dim=1, keepdim=True)
        p = torch.arange(1, vocab_size + 1, dtype=torch.float64).pow(-zipf_exponent)
        self.token_probs = (p / p.sum()).float()
        self.gen = torch.Generator().manual_seed(20_011 * (seed + 1))
        self.position = 0

    @property
    def d_in(self) -> int:
        return self.base.d_in

    @property
    def world(self):
        return getattr(self.base, "world", None)

    def __iter__(self) -> TokenMeanSource:
        return self

    def __next__(self) -> Batch:
        b = next(self.base)
        tokens = torch.multinomial(self.token_probs, b.x.shape[0], replacement=True, generator=self.gen)
        self.position += 1
        target = None if b.target is b.x else b.target  # an SAE's target is the new x itself
        return Batch(x=b.x + self.token_means[tokens], features=b.features, tokens=tokens, target=target)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"base.{k}": v for k, v in self.base.state_dict().items()}
        state.update(generator=self.gen.get_state(), position=torch.tensor(self.position, dtype=torch.int64))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.base.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("base.")})
        self.gen.set_state(state["generator"])
        self.position = int(state["position"])
