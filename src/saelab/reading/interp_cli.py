"""`saelab autointerp` and `saelab patchscope`: read an SAE's latents with an LLM, or with the model itself.

Both take the model, hookpoint and text like `saelab inspect` (flags, else the source recorded
with the SAE) and write `--out DIR/results.json` and `report.md`.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from saelab.errors import ConfigError
from saelab.io.atomic import write_json, write_text
from saelab.models.cli import _eval_rows, _model_flags, _sae_and_spec


def register(subparsers) -> None:
    p = subparsers.add_parser("autointerp", help="Explain latents with an LLM and score the explanations.")
    p.add_argument("sae", help="SAE folder (SAELens layout, e.g. RUN/sae).")
    _model_flags(p)
    _latent_flags(p)
    p.add_argument("--rows", type=int, default=128, help="Text rows to collect contexts from (default: 128).")
    p.add_argument("--skip-docs", type=int, default=0, help="Start this many documents into the data.")
    p.add_argument("--window", type=int, default=24, help="Tokens per context window (default: 24).")
    g = p.add_argument_group("LLM (explainer and scorer)")
    g.add_argument(
        "--llm",
        default="smollm2",
        help="Local chat model for transformers: a folder or 'smollm2' (default). Ignored with --llm-base-url.",
    )
    g.add_argument("--llm-base-url", help="An OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1).")
    g.add_argument("--llm-model", help="Model name at --llm-base-url.")
    g.add_argument("--llm-timeout", type=float, default=60.0, help="Seconds per request (default: 60).")
    g.add_argument("--llm-retries", type=int, default=3, help="Retries per request (default: 3).")
    g.add_argument("--llm-concurrency", type=int, default=4, help="Requests in flight (default: 4).")
    g = p.add_argument_group("scoring")
    g.add_argument("--n-explain", type=int, default=20, help="Contexts shown to the explainer (default: 20).")
    g.add_argument("--n-test", type=int, default=20, help="Activating contexts per scorer (default: 20).")
    g.add_argument("--n-random", type=int, default=10, help="Random non-activating contexts (default: 10).")
    g.add_argument("--n-hard", type=int, default=10, help="Hard negatives from decoder neighbours (default: 10).")
    g.add_argument("--per-prompt", type=int, default=5, help="Excerpts per scoring prompt (default: 5).")
    g.add_argument("--scorers", default="detection,fuzzing", help="Comma-separated: detection, fuzzing.")
    g.add_argument("--no-baseline", action="store_true", help="Skip the random-explanation baseline.")
    g.add_argument(
        "--prefill",
        action="store_true",
        help="Begin the local model's replies ('[EXPLANATION]:', '['): small models follow the format better.",
    )
    g.add_argument("--explain-max-tokens", type=int, default=80, help="Tokens an explanation may take.")
    g.add_argument("--score-max-tokens", type=int, default=40, help="Tokens a scoring reply may take.")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="Folder for results.json and report.md.")
    p.set_defaults(func=run_autointerp_cmd)

    p = subparsers.add_parser("patchscope", help="Let the model describe latents: patch a decoder direction, generate.")
    p.add_argument("sae", help="SAE folder.")
    _model_flags(p)
    _latent_flags(p)
    p.add_argument("--rows", type=int, default=32, help="Text rows for choosing latents by density (default: 32).")
    p.add_argument("--skip-docs", type=int, default=0, help="Start this many documents into the data.")
    p.add_argument("--prompt", default=None, help="Target prompt with a placeholder (default: an identity prompt).")
    p.add_argument("--placeholder", default="?", help="The placeholder text in --prompt (default: '?').")
    p.add_argument("--scales", default="0.25,0.5,1,2,4", help="Multiples of the mean residual norm to sweep.")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--mode", choices=["replace", "add"], default="replace")
    p.add_argument("--out", required=True, help="Folder for results.json and report.md.")
    p.set_defaults(func=run_patchscope_cmd)


def _latent_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latents", help="Comma-separated latent ids (default: --n-latents drawn at random).")
    p.add_argument(
        "--n-latents", type=int, default=20, help="Latents drawn at random (seeded) among those that fire enough."
    )
    p.add_argument("--latent-seed", type=int, default=0, help="Seed of that draw (default: 0).")


def parse_latents(text: str | None, d_sae: int) -> list[int] | None:
    if not text:
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--latents must be comma-separated integers (got {text!r})") from None
    bad = [i for i in out if not 0 <= i < d_sae]
    if bad:
        raise ConfigError(f"latent(s) {bad[:5]} out of range; this SAE has d_sae={d_sae} (ids 0..{d_sae - 1})")
    return out


@torch.no_grad()
def draw_latents(sae, model, hookpoint: str, batches, specials, n: int, seed: int, min_fired: int) -> list[int]:
    """`n` latents drawn uniformly (seeded) among those that fire on at least `min_fired` tokens
    of `batches` and on at most 10% of them (dense latents are not features to explain)."""
    from saelab.models import hooks
    from saelab.models.text import keep_mask

    hp = hooks.resolve(model, hookpoint)[0]
    device = next(model.parameters()).device
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    tokens = 0
    for ids, mask in batches:
        acts = hooks.run(model, ids.to(device), [hp], mask.to(device))[hp.name]
        keep = keep_mask(ids, mask, specials)
        fired += (sae.encode(acts[keep.to(acts.device)].float()) > 0).sum(0).cpu()
        tokens += int(keep.sum())
    ok = ((fired >= min_fired) & (fired <= 0.1 * tokens)).nonzero().flatten().tolist()
    if len(ok) < n:
        raise ConfigError(
            f"only {len(ok)} latents fire on at least {min_fired} of {tokens} tokens; use more --rows or fewer --n-latents"
        )
    return sorted(random.Random(seed).sample(ok, n))


def _client(args: argparse.Namespace):
    from saelab.reading.clients import OpenAIClient, TransformersClient

    if args.llm_base_url:
        if not args.llm_model:
            raise ConfigError("--llm-base-url needs --llm-model (the model name the endpoint serves)")
        return OpenAIClient(
            args.llm_model,
            base_url=args.llm_base_url,
            timeout=args.llm_timeout,
            max_retries=args.llm_retries,
            concurrency=args.llm_concurrency,
        )
    return TransformersClient(args.llm, device=args.device or "cpu")


def run_autointerp_cmd(args: argparse.Namespace) -> int:
    from saelab.reading.autointerp import (
        AutointerpConfig,
        WindowActivations,
        decoder_neighbours,
        report_markdown,
        run_autointerp,
    )
    from saelab.reading.contexts import collect_contexts

    cfg = AutointerpConfig(
        n_explain=args.n_explain,
        n_test=args.n_test,
        n_random=args.n_random,
        n_hard=args.n_hard,
        per_prompt=args.per_prompt,
        scorers=tuple(s.strip() for s in args.scorers.split(",") if s.strip()),
        baseline=not args.no_baseline,
        prefill=args.prefill,
        explain_max_tokens=args.explain_max_tokens,
        score_max_tokens=args.score_max_tokens,
        seed=args.seed,
    )
    t_start = time.perf_counter()
    sae, spec = _sae_and_spec(args)
    model, tokenizer, hookpoint, specials, batches = _eval_rows(spec, args.rows, args.skip_docs)
    latents = parse_latents(args.latents, sae.cfg.d_sae)
    if latents is None:  # drawn on the first quarter of the rows, so the draw costs a quarter of a pass
        need = -(-(cfg.n_explain + cfg.n_test) // 4)
        head = batches[: max(1, len(batches) // 4)]
        latents = draw_latents(sae, model, hookpoint, head, specials, args.n_latents, args.latent_seed, need)
    neighbours = decoder_neighbours(sae, latents, cfg.n_neighbours)
    tracked = sorted(set(latents) | {j for ns in neighbours.values() for j in ns})
    # each quantile bin is halved into explain and test contexts: keep enough for both
    per_bin = max(10, -(-2 * max(cfg.n_explain, cfg.n_test) // 10))
    t0 = time.perf_counter()
    collection = collect_contexts(
        sae,
        model,
        batches,
        hookpoint=hookpoint,
        tokenizer=tokenizer,
        specials=specials,
        latents=tracked,
        top_k=max(20, cfg.n_hard),
        per_bin=per_bin,
        window=args.window,
        seed=args.seed,
    )
    collect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    client = _client(args)
    client_load_s = time.perf_counter() - t0
    res = run_autointerp(
        collection,
        client,
        tokenizer,
        latents=latents,
        window_activations=WindowActivations(sae, model, hookpoint, tokenizer),
        neighbours=neighbours,
        config=cfg,
    )
    res = {
        "sae": str(args.sae),
        "model": spec["model"],
        "hookpoint": hookpoint,
        "data": spec["data"] if isinstance(spec["data"], (str, dict)) else "in-memory",
        "rows": args.rows,
        "skip_docs": args.skip_docs,
        "window": args.window,
        "tokens_read": collection.n_tokens,
        "latent_seed": None if args.latents else args.latent_seed,
        **res,
    }
    res["seconds"].update(collect=collect_s, client_load=client_load_s, total=time.perf_counter() - t_start)
    out = Path(args.out)
    write_json(out / "results.json", res)
    text = report_markdown(res)
    write_text(out / "report.md", text)
    print(text)
    print(f"wrote {out}/results.json, report.md")
    return 0


def run_patchscope_cmd(args: argparse.Namespace) -> int:
    from saelab.models.source import _load
    from saelab.reading.patchscope import IDENTITY_PROMPT, patchscope_latents, report_markdown

    t_start = time.perf_counter()
    sae, spec = _sae_and_spec(args)
    latents = parse_latents(args.latents, sae.cfg.d_sae)
    if latents is None:
        model, _, hookpoint, specials, batches = _eval_rows(spec, args.rows, args.skip_docs)
        latents = draw_latents(sae, model, hookpoint, batches, specials, args.n_latents, args.latent_seed, 1)
    model, tokenizer = _load(spec)
    hookpoint = spec["hookpoint"][0] if isinstance(spec["hookpoint"], list) else spec["hookpoint"]
    try:
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--scales must be comma-separated numbers (got {args.scales!r})") from None
    res = patchscope_latents(
        sae,
        model,
        tokenizer,
        latents,
        hookpoint=hookpoint,
        prompt=args.prompt or IDENTITY_PROMPT,
        placeholder=args.placeholder,
        scales=scales,
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
    )
    res = {"sae": str(args.sae), "model": spec["model"], **res, "total_seconds": time.perf_counter() - t_start}
    out = Path(args.out)
    write_json(out / "results.json", res)
    text = report_markdown(res)
    write_text(out / "report.md", text)
    print(text)
    print(f"wrote {out}/results.json, report.md")
    return 0
