"""Meta-SAEs (Bussmann, Pearce, Leask, Bloom, Sharkey, Nanda 2024; Leask et al. 2025, arXiv 2502.04878).

A small BatchTopK SAE trained on the decoder directions d_i of another SAE: each latent's direction
is rebuilt from a few meta-latents, showing that SAE latents are not atomic (e.g. "Einstein" =
science + famous + German + ...). `train_meta_sae(sae)` accepts any trained SAE (saelab's, or any
object with a `W_dec [d_sae, d_in]` tensor such as a SAELens SAE) and returns the meta-SAE, the
meta-latent codes of every latent, and which latents each meta-latent decomposes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.errors import ConfigError


@dataclass
class MetaSAEResult:
    meta_sae: Any  # the trained BatchTopK SAE (inputs: unit decoder directions)
    codes: torch.Tensor  # [d_sae, d_meta] meta-latent activations of each latent's direction
    fvu: float  # how much of the decoder directions' variance the meta-SAE leaves unexplained
    history: list = field(default_factory=list)

    def latents_of(self, meta_latent: int) -> list[tuple[int, float]]:
        """The SAE latents that meta-latent `meta_latent` takes part in, strongest first."""
        col = self.codes[:, meta_latent]
        idx = col.nonzero().flatten()
        order = col[idx].argsort(descending=True)
        return [(int(i), float(col[i])) for i in idx[order]]

    def meta_latents_of(self, latent: int) -> list[tuple[int, float]]:
        """The meta-latents that latent `latent`'s direction decomposes into, strongest first."""
        row = self.codes[latent]
        idx = row.nonzero().flatten()
        order = row[idx].argsort(descending=True)
        return [(int(i), float(row[i])) for i in idx[order]]

    def decomposition(self) -> dict[int, list[int]]:
        """meta-latent -> latents it decomposes (meta-latents used by no latent are left out)."""
        out = {}
        for m in range(self.codes.shape[1]):
            lat = [i for i, _ in self.latents_of(m)]
            if lat:
                out[m] = lat
        return out


def decoder_directions(sae: Any) -> torch.Tensor:
    w = getattr(sae, "W_dec", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ConfigError(
            f"train_meta_sae needs a trained SAE with a W_dec [d_sae, d_in] tensor (got {type(sae).__name__}); "
            "load one with saelab.load(path)"
        )
    w = w.detach().float().cpu()
    norms = w.norm(dim=1, keepdim=True)
    alive = norms.flatten() > 0
    if int(alive.sum()) < 2:
        raise ConfigError("the SAE has fewer than 2 non-zero decoder directions; there is nothing to decompose")
    return torch.where(norms > 0, w / norms.clamp_min(1e-12), w)


def train_meta_sae(
    sae: Any,
    d_meta: int | None = None,
    k: int = 4,
    steps: int = 2000,
    batch_size: int = 256,
    seed: int = 0,
    train_config: dict | None = None,
) -> MetaSAEResult:
    """Train a BatchTopK meta-SAE with `d_meta` latents (default d_sae // 4) and `k` active per direction."""
    from saelab.evals.core import reconstruction_metrics
    from saelab.train.trainer import train

    dirs = decoder_directions(sae)
    n, d = dirs.shape
    d_meta = d_meta if d_meta is not None else max(2, n // 4)
    if d_meta < 1 or k < 1 or k > d_meta:
        raise ConfigError(f"need 1 <= k <= d_meta (got k={k}, d_meta={d_meta})")
    batch_size = min(batch_size, n)

    def batches():  # reshuffled every epoch, deterministic, so training resumes exactly
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - batch_size + 1, batch_size):
                yield dirs[perm[i : i + batch_size]]

    cfg = {"architecture": "batchtopk", "d_in": d, "d_sae": d_meta, "k": k, "seed": seed}
    tc = {
        "steps": steps,
        "progress": False,
        "seed": seed,
        "norm_estimation_batches": 2,
        "dead_after_tokens": max(10 * n, 1000),
        **(train_config or {}),
    }
    result = train(cfg, batches, tc)
    meta = result.sae.eval()
    with torch.no_grad():
        codes = meta.encode(dirs)
    fvu = reconstruction_metrics(meta, [dirs]).fvu
    return MetaSAEResult(meta, codes, fvu, result.history)
