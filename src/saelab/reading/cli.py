"""`saelab dashboard`: a static feature-dashboard site for an SAE, from the shell.

Model, hookpoint and text come from the flags or from the source recorded with the SAE, as for
`saelab inspect` (the same flags and defaults, `saelab.models.cli`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from saelab.errors import ConfigError
from saelab.io.atomic import write_json


def register(subparsers) -> None:
    from saelab.models.cli import _model_flags

    p = subparsers.add_parser(
        "dashboard", help="Static feature dashboards (HTML, no server) and a Neuronpedia-style JSON export."
    )
    p.add_argument("sae", help="SAE folder (SAELens layout, e.g. RUN/sae).")
    _model_flags(p)
    p.add_argument("--rows", type=int, default=512, help="Text rows to read (default: 512).")
    p.add_argument("--skip-docs", type=int, default=0, help="Start this many documents into the data (held-out text).")
    p.add_argument(
        "--latents",
        help="Comma-separated latent ids, or 'all' (default: --n-latents of them at random among those alive).",
    )
    p.add_argument("--n-latents", type=int, default=100, help="Pages to write when --latents is not given (100).")
    p.add_argument("--top-k", type=int, default=20, help="Top contexts per latent (default: 20).")
    p.add_argument("--n-bins", type=int, default=10, help="Activation-quantile bins (default: 10).")
    p.add_argument("--per-bin", type=int, default=10, help="Contexts shown per quantile bin (default: 10).")
    p.add_argument("--window", type=int, default=32, help="Tokens per context (default: 32).")
    p.add_argument("--model-batch-size", type=int, default=8, help="Rows per forward pass (default: 8).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the samples and the latent choice (default: 0).")
    p.add_argument("--out", required=True, help="Folder for the site (index.html), contexts.json and neuronpedia/.")
    p.set_defaults(func=run_dashboard)


def choose_latents(arg: str | None, n: int, d_sae: int, alive, seed: int) -> list[int]:
    """The latents that get pages: the listed ids, all of them, or `n` at random (seeded) among
    those the training run saw fire (all latents when the SAE has no sparsity file)."""
    import torch

    if arg:
        if arg.strip() == "all":
            return list(range(d_sae))
        try:
            ids = [int(x) for x in arg.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--latents must be comma-separated integers or 'all' (got '{arg}')") from None
        if not ids:
            raise ConfigError("--latents lists no ids")
        return ids
    if n < 1:
        raise ConfigError(f"--n-latents must be at least 1 (got {n})")
    pool = torch.arange(d_sae) if alive is None else torch.nonzero(alive > 1e-9).flatten()
    if len(pool) == 0:
        pool = torch.arange(d_sae)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(pool[pick].tolist())


def run_dashboard(args: argparse.Namespace) -> int:
    from saelab.io.saelens import load_sparsity, read_config
    from saelab.models.cli import _eval_stream, _sae_and_spec
    from saelab.reading.contexts import collect_contexts
    from saelab.reading.dashboard import sites_from_metadata, write_dashboard

    t0 = time.perf_counter()
    sae, spec = _sae_and_spec(args)
    model, tokenizer, hookpoint, specials, batches = _eval_stream(
        spec, args.rows, args.skip_docs, args.model_batch_size
    )
    load_s = time.perf_counter() - t0
    latents = choose_latents(args.latents, args.n_latents, sae.cfg.d_sae, load_sparsity(args.sae), args.seed)
    data = spec["data"] if isinstance(spec["data"], (str, dict)) else "in-memory"
    t0 = time.perf_counter()
    collection = collect_contexts(
        sae,
        model,
        batches,
        hookpoint=hookpoint,
        tokenizer=tokenizer,
        specials=specials,
        latents=latents,
        top_k=args.top_k,
        n_bins=args.n_bins,
        per_bin=args.per_bin,
        window=args.window,
        seed=args.seed,
        metadata={
            "sae": str(args.sae),
            "model": str(spec["model"]),
            "data": data if isinstance(data, str) else str(data),
            "context_size": int(spec.get("context_size", 128)),
            "skip_docs": args.skip_docs,
        },
    )
    collect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metadata = read_config(args.sae).get("metadata") or {}
    summary = write_dashboard(
        collection, sae, model, args.out, tokenizer, sites=sites_from_metadata(metadata, hookpoint)
    )
    render_s = time.perf_counter() - t0
    record = {
        "sae": str(args.sae),
        "model": str(spec["model"]),
        "tokens": collection.n_tokens,
        "rows": collection.n_rows,
        **summary,
        "load_seconds": round(load_s, 2),
        "collect_seconds": round(collect_s, 2),
        "render_seconds": round(render_s, 2),
    }
    out = Path(args.out)
    write_json(out / "results.json", record)
    print(
        f"{collection.n_tokens:,} tokens, {summary['pages']} latent pages -> {out / 'index.html'} "
        f"(collect {collect_s:.1f} s, render {render_s:.1f} s)"
    )
    return 0
