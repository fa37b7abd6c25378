"""Steering: change a model's behaviour through one SAE latent, during any forward or generation.

- `add`: x -> x + scale * d_i, with d_i the latent's decoder direction (row i of W_dec). When the
  hookpoint feeds the unembedding linearly, the logits move by exactly scale * W_U d_i, which
  is the prediction the tests check; further upstream the effect passes through later layers.
- `clamp`: x -> x + (value - f_i(x)) * d_i, with f_i the SAE's latent activation: the latent is
  set to `value` while the SAE's error term and every other latent are kept as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from saelab.errors import ConfigError
from saelab.models import hooks


def latent_direction(sae, latent: int) -> torch.Tensor:
    if not 0 <= latent < sae.cfg.d_sae:
        raise ConfigError(f"latent {latent} is out of range; this SAE has d_sae={sae.cfg.d_sae} latents")
    return sae.W_dec[latent].detach()


def _one(model, hookpoint: str) -> hooks.Hookpoint:
    hps = hooks.resolve(model, hookpoint)
    if len(hps) != 1:
        raise ConfigError(f"hookpoint '{hookpoint}' matches {len(hps)} modules; steer at one")
    return hps[0]


@contextlib.contextmanager
def steer(
    model: torch.nn.Module,
    hookpoint: str,
    sae=None,
    latent: int | None = None,
    *,
    scale: float = 0.0,
    mode: str = "add",
    direction: torch.Tensor | None = None,
) -> Iterator[None]:
    """Inside the block, every forward of `model` (and so `model.generate`) is steered."""
    hp = _one(model, hookpoint)
    if mode == "add":
        if direction is None:
            if sae is None or latent is None:
                raise ConfigError("steering with mode 'add' needs an SAE and a latent, or a direction")
            direction = latent_direction(sae, latent)
        d = direction.detach()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return x + scale * d.to(x.device, x.dtype)
    elif mode == "clamp":
        if sae is None or latent is None:
            raise ConfigError("steering with mode 'clamp' needs an SAE and a latent")
        d = latent_direction(sae, latent)

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                f = sae.encode(x.float())[:, latent]
            return (x.float() + (scale - f)[:, None] * d.to(x.device)).to(x.dtype)
    else:
        raise ConfigError(f"unknown steering mode '{mode}'; use 'add' or 'clamp'")
    with hooks.intervene(model, hp, fn):
        yield


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    hookpoint: str,
    sae,
    latent: int,
    *,
    scale: float,
    mode: str = "add",
    max_new_tokens: int = 30,
    seed: int = 0,
) -> dict[str, str]:
    """Greedy continuations of `prompt` without and with steering, for a side-by-side look."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    plain = model.generate(**enc, **kwargs)
    with steer(model, hookpoint, sae, latent, scale=scale, mode=mode):
        steered = model.generate(**enc, **kwargs)
    n = enc["input_ids"].shape[1]
    return {
        "prompt": prompt,
        "plain": tokenizer.decode(plain[0, n:], skip_special_tokens=True),
        "steered": tokenizer.decode(steered[0, n:], skip_special_tokens=True),
    }
