"""Patchscope: let the model say what a latent's decoder direction means.

The hidden state at the SAE's hookpoint, at a placeholder token of an identity-style target
prompt ("cat -> cat\\n1135 -> 1135\\nhello -> hello\\n? ->"), is replaced by s * d_j (d_j the
latent's decoder row), and the model generates greedily. The patch is *held*: generation runs
without a KV cache and the placeholder position is re-patched in every forward, so each generated
token sees the patched state. (Ghandeharioun et al., arXiv 2401.06102; SelfIE / self-explaining
SAE features for the latent version.)

The scale matters (unit decoder rows are far below residual norms), so it is swept as multiples
of the target prompt's mean residual norm at the hookpoint, and one is picked per latent by this
rule: among the scales whose self-similarity (cosine of the last block's output at the placeholder
with d_j) is at least half the sweep's largest, the one with the lowest entropy of the first
generated token's distribution (ties: the smaller scale). Below that band the model does not
"hear" the direction; within it, a confident answer beats a diffuse one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from saelab.errors import ConfigError
from saelab.models import hooks

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n? ->"
PLACEHOLDER = "?"
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def placeholder_position(tokenizer, prompt: str, placeholder: str = PLACEHOLDER) -> tuple[list[int], int]:
    """(prompt token ids, index of the token holding the last occurrence of `placeholder`)."""
    at = prompt.rfind(placeholder)
    if at < 0:
        raise ConfigError(f"the target prompt {prompt!r} has no placeholder {placeholder!r}; put one where to patch")
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc.get("offset_mapping")
    if offsets is None:
        raise ConfigError("Patchscope needs a fast tokenizer (character offsets) to find the placeholder token")
    pos = [i for i, (a, b) in enumerate(offsets) if a <= at < b]
    if not pos:
        raise ConfigError(f"no token of the target prompt covers the placeholder {placeholder!r}")
    if pos[0] == 0:
        raise ConfigError("the placeholder is the prompt's first token; put some text before it (Patchscope pitfall)")
    return ids, pos[0]


def block_list(model: torch.nn.Module) -> str:
    """Module path of the model's stack of blocks: its longest ModuleList."""
    best = max(
        ((name, len(m)) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)),
        key=lambda x: x[1],
        default=None,
    )
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of blocks to read the final residual from")
    return best[0]


@torch.no_grad()
def patched_generate(
    model: torch.nn.Module,
    ids: Sequence[int],
    hookpoint: str,
    vectors: torch.Tensor,
    position: int,
    *,
    max_new_tokens: int = 8,
    mode: str = "replace",
) -> dict[str, Any]:
    """Greedy generation for each row of `vectors` [n, d], with the hidden state at (hookpoint,
    `position`) replaced by (or, with mode 'add', increased by) that row in every forward.

    Returns the generated ids [n, max_new_tokens], the entropy of the first generated token's
    distribution [n] and the last block's output at `position` on the first forward [n, d].
    """
    if mode not in ("replace", "add"):
        raise ConfigError(f"unknown patch mode '{mode}'; use 'replace' or 'add'")
    hp = hooks.resolve(model, hookpoint)[0]
    last = hooks.Hookpoint(f"{block_list(model)}.{len(dict(model.named_modules())[block_list(model)]) - 1}")
    device = next(model.parameters()).device
    n = vectors.shape[0]
    seq = torch.tensor([list(ids)] * n, dtype=torch.int64, device=device)
    vec = vectors.to(device)

    def patch(rows: torch.Tensor) -> torch.Tensor:  # rows: the placeholder row of every sequence, in order
        return vec.to(rows.dtype) if mode == "replace" else rows + vec.to(rows.dtype)

    entropy = final = None
    kwargs = {"use_cache": False} if hooks._accepts_use_cache(model) else {}
    for step in range(max_new_tokens):
        mask = torch.zeros(seq.shape, dtype=torch.bool)
        mask[:, position] = True
        with hooks.intervene(model, hp, patch, positions=mask), hooks.capture(model, [last], stop_early=False) as got:
            logits = model(input_ids=seq, **kwargs).logits[:, -1].float()
        if step == 0:
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).cpu()
            final = got[last.name][:, position].float().cpu()
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return {"generated": seq[:, len(ids) :].cpu(), "entropy": entropy, "final": final}


def choose_scale(self_similarity: Sequence[float], entropy: Sequence[float]) -> int:
    """Index of the chosen scale (the rule in the module docstring)."""
    top = max(self_similarity)
    band = [i for i, s in enumerate(self_similarity) if s >= 0.5 * top] if top > 0 else list(range(len(entropy)))
    return min(band, key=lambda i: (entropy[i], i))


@torch.no_grad()
def mean_residual_norm(model, ids: Sequence[int], hookpoint: str) -> float:
    """Mean norm of the hidden state at `hookpoint` over the prompt, first token left out (it is
    often an attention sink with an outsized norm)."""
    hp = hooks.resolve(model, hookpoint)[0]
    device = next(model.parameters()).device
    act = hooks.run(model, torch.tensor([list(ids)], device=device), [hp])[hp.name][0].float()
    return float(act[1:].norm(dim=-1).mean()) if act.shape[0] > 1 else float(act.norm(dim=-1).mean())


def patchscope_latents(
    sae,
    model: torch.nn.Module,
    tokenizer,
    latents: Sequence[int],
    *,
    hookpoint: str,
    prompt: str = IDENTITY_PROMPT,
    placeholder: str = PLACEHOLDER,
    scales: Sequence[float] = SCALES,
    max_new_tokens: int = 8,
    mode: str = "replace",
    progress: bool = True,
) -> dict[str, Any]:
    """What the model says about each latent, at every scale of the sweep and at the chosen one."""
    from saelab.evals.downstream import check_width
    from saelab.progress import bar as progress_bar

    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"scales must be positive multiples of the residual norm (got {list(scales)})")
    hp = hooks.resolve(model, hookpoint)[0]
    check_width(model, hp, sae.cfg.d_in)
    for i in latents:
        if not 0 <= int(i) < sae.cfg.d_sae:
            raise ConfigError(f"latent {i} is out of range; this SAE has d_sae={sae.cfg.d_sae}")
    ids, pos = placeholder_position(tokenizer, prompt, placeholder)
    norm = mean_residual_norm(model, ids, hp.name)
    t0 = time.perf_counter()
    out = []
    for i in progress_bar([int(i) for i in latents], desc="patchscope", enabled=progress):
        d = sae.W_dec[i].detach().float()
        unit = d / d.norm().clamp_min(1e-12)
        vectors = torch.stack([s * norm * unit for s in scales])
        g = patched_generate(model, ids, hp.name, vectors, pos, max_new_tokens=max_new_tokens, mode=mode)
        sims = torch.nn.functional.cosine_similarity(g["final"], unit[None].expand_as(g["final"]), dim=-1).tolist()
        ents = g["entropy"].tolist()
        sweep = []
        for k, s in enumerate(scales):
            text = tokenizer.decode(g["generated"][k].tolist(), skip_special_tokens=True)
            sweep.append(
                {
                    "scale": float(s),
                    "norm": float(s * norm),
                    "text": text,
                    "answer": _answer(text),
                    "self_similarity": sims[k],
                    "entropy": ents[k],
                }
            )
        pick = choose_scale(sims, ents)
        out.append({"latent": i, "chosen": sweep[pick], "sweep": sweep})
    return {
        "hookpoint": hp.name,
        "prompt": prompt,
        "placeholder": placeholder,
        "placeholder_token": tokenizer.decode([ids[pos]]),
        "placeholder_position": pos,
        "mode": mode,
        "scales": [float(s) for s in scales],
        "scale_unit": "multiples of the target prompt's mean residual norm at the hookpoint (first token left out)",
        "mean_residual_norm": norm,
        "max_new_tokens": max_new_tokens,
        "rule": "among scales with self-similarity >= 0.5 x the sweep's max, the lowest first-token entropy",
        "latents": out,
        "seconds": time.perf_counter() - t0,
    }


def _answer(text: str) -> str:
    """The first line of the generation: what the identity prompt asks the model to fill in."""
    stripped = text.strip("\n")
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def report_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Patchscope",
        "",
        f"Target prompt {res['prompt']!r}, patched at token {res['placeholder_position']} "
        f"({res['placeholder_token']!r}) of {res['hookpoint']} ({res['mode']}), held for all "
        f"{res['max_new_tokens']} greedy tokens.",
        f"Scales: {res['scales']} x mean residual norm {res['mean_residual_norm']:.2f}. Rule: {res['rule']}.",
        f"Time: {res['seconds']:.0f} s.",
        "",
        "| latent | chosen scale | self-sim. | entropy | answer | at every scale |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["latents"]:
        c = r["chosen"]
        every = "; ".join(f"{s['scale']:g}: {_cell(s['answer'])}" for s in r["sweep"])
        lines.append(
            f"| {r['latent']} | {c['scale']:g} | {c['self_similarity']:.2f} | {c['entropy']:.2f} | "
            f"{_cell(c['answer'])} | {every} |"
        )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return "`" + (text.replace("|", "\\|").replace("`", "'") or " ") + "`" if text else "(empty)"


__all__ = [
    "IDENTITY_PROMPT",
    "PLACEHOLDER",
    "SCALES",
    "choose_scale",
    "mean_residual_norm",
    "patched_generate",
    "patchscope_latents",
    "placeholder_position",
    "report_markdown",
]
