"""Synthetic token ids with known per-token means, on top of any source.

Real residual streams carry a large component that depends only on the current token. This
wrapper reproduces that on a ground-truth world: each row gets a token id t (Zipf-distributed over
`vocab_size`) and x += token_means[t], with `token_means` known. Tokenized SAEs are tested on it;
the source spec is `{type: toy_tokens, world: {...}, vocab_size: 64, mean_norm: 1.0}`.
"""

from __future__ import annotations

from typing import Any

import torch

from saelab.activations.base import Batch
from saelab.activations.factory import register_source
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
        return Batch(x=b.x + self.token_means[tokens], features=b.features, tokens=tokens, target=b.target)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"base.{k}": v for k, v in self.base.state_dict().items()}
        state.update(generator=self.gen.get_state(), position=torch.tensor(self.position, dtype=torch.int64))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.base.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("base.")})
        self.gen.set_state(state["generator"])
        self.position = int(state["position"])


@register_source("toy_tokens")
def _toy_tokens(spec: dict[str, Any]):
    from saelab.toys.features import ToySource
    from saelab.toys.worlds import World

    allowed = {"world", "batch_size", "seed", "vocab_size", "mean_norm", "zipf_exponent", "token_seed"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in toy_tokens source; valid keys: {sorted(allowed)}")
    seed = int(spec.get("seed", 0))
    base = ToySource(World(spec.get("world") or {}), int(spec.get("batch_size", 1024)), seed)
    return TokenMeanSource(
        base,
        int(spec.get("vocab_size", 64)),
        float(spec.get("mean_norm", 1.0)),
        float(spec.get("zipf_exponent", 1.0)),
        seed,
        int(spec.get("token_seed", 0)),
    )
