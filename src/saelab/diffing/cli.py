"""`saelab diff`: the model diff of a saved two-model crosscoder.

    saelab diff RUN/sae --out DIR [--source CONFIG] [--batches N] [--base SITE --ft SITE]

reads held-out batches from the source the crosscoder was trained on (reseeded; or `--source`),
and writes `DIR/results.json`, `report.md`, `report.html` and the PNG plots (`saelab.diffing.report`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diff", help="Model diff of a two-model crosscoder: relative decoder norms, Latent Scaling, report."
    )
    p.add_argument("path", help="Crosscoder folder (saved by `saelab train` or saelab.save).")
    p.add_argument("--out", required=True, help="Folder for results.json, report.md, report.html and plots.")
    p.add_argument("--source", help="YAML/JSON source config (default: the source it was trained on, reseeded).")
    p.add_argument("--batches", type=int, default=8, help="Held-out batches (default: 8).")
    p.add_argument("--base", help="The base model's site or alias (default: alias 'base', else the first site).")
    p.add_argument("--ft", help="The fine-tuned model's site or alias (default: the other site).")
    p.add_argument("--base-max", type=float, default=0.1, help="r below this: base-only (default: 0.1).")
    p.add_argument("--ft-min", type=float, default=0.9, help="r above this: fine-tune-only (default: 0.9).")
    p.add_argument("--shared", type=float, nargs=2, default=(0.3, 0.7), help="r range of shared latents.")
    p.add_argument("--nu-eps", type=float, default=0.2, help="nu_eps above this flags Complete Shrinkage.")
    p.add_argument("--nu-r", type=float, default=0.2, help="nu_r above this flags Latent Decoupling.")
    p.set_defaults(func=run_diff)


def run_diff(args: argparse.Namespace) -> int:
    from saelab.activations.factory import held_out, parse_source
    from saelab.commands import read_config_file
    from saelab.diffing.crosscoder import Thresholds, diff_crosscoder
    from saelab.diffing.report import write_report
    from saelab.errors import ConfigError, FileFormatError
    from saelab.io.formats import load, read_metadata
    from saelab.report import text_table

    if args.batches < 1:
        raise ConfigError(f"--batches must be at least 1 (got {args.batches})")
    thresholds = Thresholds(args.base_max, args.ft_min, tuple(args.shared), args.nu_eps, args.nu_r)
    sae = load(args.path)
    if args.source:
        spec = read_config_file(args.source)
        source = parse_source(spec.get("source", spec))
    else:
        try:
            spec = read_metadata(args.path).get("saelab_source")
        except FileFormatError:
            spec = None
        if not isinstance(spec, dict):
            raise ConfigError(f"{args.path} does not record its source; pass --source CONFIG")
        source = held_out(spec)
    stream = source.build()
    batches = [next(stream) for _ in range(args.batches)]
    result = diff_crosscoder(sae, batches, args.base, args.ft, thresholds)
    paths = write_report(result, Path(args.out), title=f"Crosscoder diff of {args.path}")
    print(text_table([{"category": k, "latents": v} for k, v in result.counts.items()]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
