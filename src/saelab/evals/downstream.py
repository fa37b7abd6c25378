"""Downstream fidelity: splice an SAE into a model's forward pass and measure what is lost.

At the SAE's hookpoint the activation x is replaced (at the positions the SAE was trained on:
real tokens, not BOS/pad/specials) by
- the reconstruction x̂ = SAE(x): CE loss and KL(clean || spliced) say how much behaviour the
  SAE keeps;
- zero (x -> 0) and the mean activation: the two usual baselines for
  CE loss recovered = (CE_ablation - CE_SAE) / (CE_ablation - CE_clean);
- x̂ + (x - x̂), the SAE with its error term added back: the identity, computed in float64 so it
  gives back x bit for bit and therefore the clean logits exactly. It checks that the splice
  itself changes nothing, and it is the form circuit analyses use (error node kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from saelab.errors import ConfigError
from saelab.models import hooks
from saelab.models.text import keep_mask


@dataclass
class DownstreamMetrics:
    hookpoint: str
    scored_positions: int  # next-token predictions scored
    spliced_positions: int  # positions whose activation was replaced
    ce_clean: float
    ce_sae: float
    ce_sae_with_error: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    ce_recovered_vs_zero: float
    ce_recovered_vs_mean: float
    kl_sae: float  # mean KL(clean || spliced) per scored position, nats
    kl_sae_with_error: float
    kl_zero_ablation: float
    kl_mean_ablation: float
    max_abs_logit_diff_with_error: float  # 0.0 when the error term restores the clean output exactly

    def to_dict(self) -> dict:
        return asdict(self)


def with_error_term(sae, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ + (x - x̂) in float64: exactly x, but routed through the SAE (the error node kept)."""
    x_hat = sae(x.float(), tokens=tokens).double()
    return (x_hat + (x.double() - x_hat)).to(x.dtype)


def check_width(model: torch.nn.Module, hp: hooks.Hookpoint, d_in: int, model_name: str = "") -> None:
    ids = torch.zeros((1, 2), dtype=torch.int64, device=next(model.parameters()).device)
    width = hooks.run(model, ids, [hp])[hp.name].shape[-1]
    if width != d_in:
        raise ConfigError(
            f"hookpoint {hp} of model {model_name or type(model).__name__} has width {width} "
            f"but the SAE has d_in={d_in}; use the model and hookpoint the SAE was trained on"
        )


def _ce(logits: torch.Tensor, ids: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[score]


def _kl(clean_logp: torch.Tensor, logits: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(logits[:, :-1].float(), -1)[score]
    return (clean_logp.exp() * (clean_logp - logq)).sum(-1)


@torch.no_grad()
def downstream_fidelity(
    sae,
    model: torch.nn.Module,
    hookpoint: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    specials: torch.Tensor | None = None,
    model_name: str = "",
) -> DownstreamMetrics:
    """Splice `sae` at `hookpoint` over `batches` of (input_ids [B, T], attention_mask [B, T])."""
    hp = hooks.resolve(model, hookpoint)
    if len(hp) != 1:
        raise ConfigError(f"hookpoint '{hookpoint}' matches {len(hp)} modules; name the one the SAE was trained on")
    hp = hp[0]
    check_width(model, hp, sae.cfg.d_in, model_name)
    sae = sae.eval()
    device = next(model.parameters()).device
    batches = [(ids.to(device), mask.to(device)) for ids, mask in batches]
    if not batches:
        raise ConfigError("no text to evaluate on: the dataset gave no rows")
    # mean activation over the spliced positions: the mean-ablation baseline
    total, count = None, 0
    for ids, mask in _bar(batches, "fidelity: mean activation (ablation baseline)"):
        keep = keep_mask(ids, mask, specials)
        a = hooks.run(model, ids, [hp], mask)[hp.name][keep].double()
        total = a.sum(0) if total is None else total + a.sum(0)
        count += a.shape[0]
    if count == 0:
        raise ConfigError("every position is padding or a special token; nothing to splice")
    mean = (total / count).float()

    def variants(tokens: torch.Tensor) -> dict:
        """What replaces the activations at the spliced positions, whose token ids are `tokens`."""
        return {
            "sae": lambda x: sae(x.float(), tokens=tokens),
            "sae_with_error": lambda x: with_error_term(sae, x, tokens),
            "zero_ablation": lambda x: torch.zeros_like(x),
            "mean_ablation": lambda x: mean.to(x.device).expand_as(x),
        }

    names = list(variants(torch.zeros(0, dtype=torch.int64)))
    ce = {k: [] for k in ["clean", *names]}
    kl = {k: [] for k in names}
    max_diff = 0.0
    spliced = 0
    for ids, mask in _bar(batches, f"fidelity: clean + {len(names)} spliced forwards"):
        keep = keep_mask(ids, mask, specials)
        score = mask[:, :-1].bool() & mask[:, 1:].bool()
        spliced += int(keep.sum())
        clean = model(input_ids=ids, attention_mask=mask).logits
        clean_logp = torch.log_softmax(clean[:, :-1].float(), -1)[score]
        ce["clean"].append(_ce(clean, ids, score))
        for name, fn in variants(ids[keep]).items():
            with hooks.intervene(model, hp, fn, keep):
                logits = model(input_ids=ids, attention_mask=mask).logits
            ce[name].append(_ce(logits, ids, score))
            kl[name].append(_kl(clean_logp, logits, score))
            if name == "sae_with_error":
                max_diff = max(max_diff, float((logits - clean).abs().max()))
    m = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    k = {name: float(torch.cat(v).mean()) for name, v in kl.items()}

    def recovered(base: float) -> float:
        return (base - m["sae"]) / (base - m["clean"]) if base != m["clean"] else float("nan")

    return DownstreamMetrics(
        hookpoint=hp.name,
        scored_positions=int(torch.cat(ce["clean"]).numel()),
        spliced_positions=spliced,
        ce_clean=m["clean"],
        ce_sae=m["sae"],
        ce_sae_with_error=m["sae_with_error"],
        ce_zero_ablation=m["zero_ablation"],
        ce_mean_ablation=m["mean_ablation"],
        ce_recovered_vs_zero=recovered(m["zero_ablation"]),
        ce_recovered_vs_mean=recovered(m["mean_ablation"]),
        kl_sae=k["sae"],
        kl_sae_with_error=k["sae_with_error"],
        kl_zero_ablation=k["zero_ablation"],
        kl_mean_ablation=k["mean_ablation"],
        max_abs_logit_diff_with_error=max_diff,
    )


def _bar(batches: list, desc: str):
    """A progress bar with rate and ETA (lines off a terminal): fidelity runs several model
    forwards per batch and takes minutes on a real model."""
    from saelab.progress import bar

    return bar(batches, desc=desc, unit="batch")
