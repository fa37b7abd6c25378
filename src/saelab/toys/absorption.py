"""Chanin et al.'s toy of feature absorption (LW 2024; arXiv 2409.14507), with its tied ablation.

Four orthogonal features in R^50; feature 1 (child) fires only when feature 0 (parent) fires;
features 2 and 3 are independent. A 4-latent L1 SAE learns a child latent whose decoder carries
the parent direction while the parent latent stays silent on child tokens. Tying the encoder to
the decoder (W_enc = W_dec^T) removes the asymmetry that absorption needs. The tied SAE is a
toy-only ablation, so it is not registered as an architecture.

`reference_dictionaries` builds the trivial baselines of the hierarchy metrics by hand: the true
features, the parent + child composites an absorbing SAE learns, and a random dictionary.
"""

from __future__ import annotations

from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.sae.base import SAE, TrainOutput
from saelab.sae.relu import ReLUConfig, ReLUSAE

ABSORPTION_WORLD: dict[str, Any] = {
    "kind": "hierarchy",
    "d": 50,
    "nodes": [
        {"parent": None, "prob": 0.25},  # 0: parent ("starts with S")
        {"parent": 0, "prob": 0.4},  # 1: child ("short"), only with its parent
        {"parent": None, "prob": 0.25},
        {"parent": None, "prob": 0.25},
    ],
}


class TiedReLUSAE(ReLUSAE):
    """ReLU-L1 SAE whose encoder is its decoder's transpose (times a scale from input folding)."""

    architecture = "relu"  # saves and loads as a plain ReLU SAE: W_enc is kept equal to the tied encoder

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        self.W_enc.requires_grad_(False)
        self.register_buffer("enc_scale", torch.ones(()))

    def tied_encoder(self) -> torch.Tensor:
        return self.W_dec.t() * self.enc_scale

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.tied_encoder() + self.b_enc

    @torch.no_grad()
    def after_optimizer_step(self, out: TrainOutput) -> None:
        super().after_optimizer_step(out)
        self.W_enc.copy_(self.tied_encoder())

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)  # W_dec /= s, so the tie needs s^2 to make W_enc *= s
        self.enc_scale *= scale * scale
        self.W_enc.copy_(self.tied_encoder())


def absorption_toy(
    tied: bool, seed: int, steps: int = 1500, l1_coefficient: float | None = None, eval_tokens: int = 8192
) -> dict[str, float]:
    """Train the toy SAE once and return its absorption and hedging metrics."""
    from saelab.evals.pathology import absorption, hedging
    from saelab.sae.registry import make_config
    from saelab.toys.features import ToySource
    from saelab.toys.worlds import World
    from saelab.train.trainer import train

    world = World({**ABSORPTION_WORLD, "seed": seed})
    cfg = {"architecture": "relu", "d_in": 50, "d_sae": 4, "seed": seed}
    if l1_coefficient is not None:
        cfg["l1_coefficient"] = l1_coefficient
    cfg = make_config(cfg)
    sae = TiedReLUSAE(cfg) if tied else ReLUSAE(cfg)
    train(sae, ToySource(world, 512, seed), {"steps": steps, "progress": False, "seed": seed})
    gen = torch.Generator().manual_seed(99_991 + seed)
    held_out = [world.sample(eval_tokens // 4, gen) for _ in range(4)]
    pairs = world.parent_child_pairs()
    ab = absorption(sae, held_out, world.directions, pairs)
    return {**ab.as_dict(), "hedging": hedging(sae, world.directions, pairs).hedging}


def hand_built(dec: torch.Tensor, enc: torch.Tensor) -> SAE:
    """A ReLU SAE with decoder rows `dec` [M, d], encoder columns `enc` [d, M] and zero biases."""
    from saelab.sae.registry import create

    m, d = dec.shape
    sae = create({"architecture": "relu", "d_in": d, "d_sae": m})
    with torch.no_grad():
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(enc)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def reference_dictionaries(world, seed: int = 0) -> dict[str, SAE]:
    """Dictionaries whose hierarchy scores are known by construction, for a world with parent/child pairs.

    - `features`: one latent per true feature (encoder = decoder^T): features recovered 1, no absorption;
    - `composites`: one latent per (parent, child), decoding unit(parent + child) and reading the
      child (Chanin et al.'s absorbing solution): composites recovered 1, every parent absorbed;
    - `random`: n_features random unit rows (encoder = decoder^T), the size the bench trains.
    """
    from saelab.evals.core import unit_rows
    from saelab.evals.pathology import composite_directions

    pairs = world.parent_child_pairs()
    if not pairs:
        raise ConfigError(f"reference dictionaries need a world with a hierarchy (got kind '{world.kind}')")
    u = unit_rows(world.directions.float())
    comp = composite_directions(u, pairs)
    child = u[[c for _, c in pairs]]
    reads_child = child / (comp * child).sum(-1, keepdim=True)  # writes the child's magnitude along it
    gen = torch.Generator().manual_seed(seed)
    rand = unit_rows(torch.randn(world.n_features, world.d_in, generator=gen))
    return {
        "features": hand_built(u, u.t()),
        "composites": hand_built(comp, reads_child.t()),
        "random": hand_built(rand, rand.t()),
    }
