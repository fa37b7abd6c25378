"""Description length of a trained SAE under a distortion bound (Ayonrinde et al. 2024, arXiv 2410.11179).

DL (bits per token) = sum_i H_b(p_i) + L0 * b*, where p_i is latent i's firing frequency and b* the
fewest bits per active value such that reconstructing from values uniformly quantised to b* bits
(per latent, over that latent's observed range) keeps FVU <= max_fvu. An SAE that misses the
bound even unquantised has no valid code (DL = inf). `rank_by_description_length` orders SAEs by DL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from saelab.errors import ConfigError
from saelab.evals.core import _batches, eval_mode
from saelab.sae.base import SAE
from saelab.sae.mdl import binary_entropy_bits


@dataclass
class DescriptionLength:
    bits_per_token: float  # position_bits + value_bits (inf when the bound cannot be met)
    position_bits: float  # sum_i H_b(p_i)
    value_bits: float  # l0 * precision_bits
    precision_bits: int | None  # bits per active value needed to meet the bound
    l0: float
    fvu: float  # unquantised
    fvu_quantised: float  # at precision_bits
    max_fvu: float
    within_bound: bool

    def as_dict(self) -> dict:
        return asdict(self)


def quantise(f: torch.Tensor, bits: int) -> torch.Tensor:
    """Round each active value to one of 2^bits levels spanning that latent's active range."""
    active = f != 0
    big = torch.finfo(f.dtype).max
    lo = torch.where(active, f, torch.full_like(f, big)).min(0).values
    hi = torch.where(active, f, torch.full_like(f, -big)).max(0).values
    span = (hi - lo).clamp_min(1e-12)
    levels = 2**bits - 1
    q = lo + torch.round((f - lo) / span * levels) / levels * span
    return torch.where(active, q, torch.zeros_like(f))


def description_length(sae: SAE, batches: Iterable, max_fvu: float = 0.1, max_bits: int = 16) -> DescriptionLength:
    if not 0 < max_fvu < 1:
        raise ConfigError(f"max_fvu must be in (0, 1) (got {max_fvu}); it is the distortion bound as an FVU")
    xs, fs, toks = [], [], []
    with eval_mode(sae):
        for b in _batches(batches):
            x = b.x.to(sae.b_dec.device, torch.float32)
            xs.append(x)
            fs.append(sae.encode(x))
            toks.append(b.tokens)
        if not xs:
            raise ConfigError("no batches to evaluate on; give at least one batch")
        x, f = torch.cat(xs), torch.cat(fs)
        tokens = torch.cat(toks) if all(t is not None for t in toks) else None

        def fvu_of(codes: torch.Tensor) -> float:
            x_hat = sae.decode(codes, tokens=tokens)
            return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))

        p = (f != 0).float().mean(0)
        position = float(binary_entropy_bits(p).sum())
        l0 = float((f != 0).float().sum(-1).mean())
        fvu = fvu_of(f)
        bits, fvu_q = None, math.inf
        if fvu <= max_fvu:
            for b in range(1, max_bits + 1):
                fvu_q = fvu_of(quantise(f, b))
                if fvu_q <= max_fvu:
                    bits = b
                    break
    ok = bits is not None
    value = l0 * bits if ok else math.inf
    return DescriptionLength(position + value if ok else math.inf, position, value, bits, l0, fvu, fvu_q, max_fvu, ok)


def rank_by_description_length(
    saes: dict[str, SAE], batches: list, max_fvu: float = 0.1
) -> list[tuple[str, DescriptionLength]]:
    """(name, DL) pairs, shortest description first; SAEs outside the bound come last."""
    if not saes:
        raise ConfigError("give at least one SAE to rank")
    batches = list(batches)
    scored = [(name, description_length(sae, batches, max_fvu)) for name, sae in saes.items()]
    return sorted(scored, key=lambda item: item[1].bits_per_token)
