"""`saelab diff`: model diffs, of a two-model crosscoder or stage-wise.

    saelab diff crosscoder RUN/sae --out DIR [--source CONFIG] [--batches N] [--base SITE --ft SITE]
    saelab diff crosscoder RUN_CONFIG.yaml --out DIR   # train the crosscoder (into DIR/run), then diff it
    saelab diff stages CONFIG --out DIR                # train S, D, M, F and a control, then read rotations
    saelab diff RUN/sae --out DIR                      # = saelab diff crosscoder RUN/sae

The crosscoder diff reads held-out batches from the source the crosscoder was trained on
(reseeded; or `--source`). Both write `DIR/results.json`, `report.md`, `report.html` and PNG
plots (`saelab.diffing.report`, `saelab.diffing.stages_report`); the stage-wise diff also keeps
every stage's training run and SAE in DIR/stages/<stage>/ (rerunning resumes them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("crosscoder", "stages")
CROSSCODER_ONLY = ("source", "batches", "base", "ft", "base_max", "ft_min", "shared", "nu_eps", "nu_r")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diff",
        help="Model diff: a two-model crosscoder (relative norms, Latent Scaling) or stage-wise (rotations).",
        description="saelab diff [crosscoder|stages] PATH --out DIR (the kind defaults to crosscoder).",
    )
    p.add_argument("kind_or_path", metavar="[crosscoder|stages]", help="The kind of diff (default: crosscoder).")
    p.add_argument(
        "path",
        nargs="?",
        help="crosscoder: a crosscoder folder, or a run config to train one; stages: the YAML/JSON stages config.",
    )
    p.add_argument("--out", required=True, help="Folder for results.json, report.md, report.html and plots.")
    cc = p.add_argument_group("crosscoder diff")
    cc.add_argument("--source", help="YAML/JSON source config (default: the source it was trained on, reseeded).")
    cc.add_argument("--batches", type=int, help="Held-out batches (default: 8).")
    cc.add_argument("--base", help="The base model's site or alias (default: alias 'base', else the first site).")
    cc.add_argument("--ft", help="The fine-tuned model's site or alias (default: the other site).")
    cc.add_argument("--base-max", type=float, help="r below this: base-only (default: 0.1).")
    cc.add_argument("--ft-min", type=float, help="r above this: fine-tune-only (default: 0.9).")
    cc.add_argument("--shared", type=float, nargs=2, help="r range of shared latents (default: 0.3 0.7).")
    cc.add_argument("--nu-eps", type=float, help="nu_eps above this flags Complete Shrinkage (default: 0.2).")
    cc.add_argument("--nu-r", type=float, help="nu_r above this flags Latent Decoupling (default: 0.2).")
    p.set_defaults(func=run_diff)


def run_diff(args: argparse.Namespace) -> int:
    from saelab.errors import ConfigError

    kind, path = args.kind_or_path, args.path
    if kind not in KINDS:
        if path is not None:
            raise ConfigError(
                f"unknown diff kind {kind!r}; use `saelab diff crosscoder PATH` or `saelab diff stages CONFIG`"
            )
        kind, path = "crosscoder", kind
    if path is None:
        raise ConfigError(f"saelab diff {kind} needs a {'config' if kind == 'stages' else 'crosscoder folder'}")
    if kind == "stages":
        given = [f"--{k.replace('_', '-')}" for k in CROSSCODER_ONLY if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} belong(s) to the crosscoder diff; set stage-wise options in CONFIG")
        return run_stages_diff(path, Path(args.out))
    return run_crosscoder_diff(args, path)


def run_stages_diff(config_path: str, out: Path) -> int:
    from saelab.commands import read_config_file
    from saelab.diffing.stages import MODEL_TRANSITIONS, run_stages
    from saelab.report import text_table

    result = run_stages(read_config_file(config_path), out, title=f"Stage-wise model diff of {config_path}")
    print(text_table([{"transition": name, **row} for name, row in result.summary().items()]))
    for name in MODEL_TRANSITIONS:
        rows = result.ranked(name, "decoder", 5)
        print(f"{name}: {len(result.ranked(name, 'decoder', None))} latents beyond the control's null; most rotated:")
        print(
            text_table(rows, ["latent", "decoder", "encoder", "control", "beyond_null", "fires"]) if rows else "none\n"
        )
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'report.html'} and plots")
    return 0


def run_crosscoder_diff(args: argparse.Namespace, path: str) -> int:
    from saelab.activations.factory import held_out, parse_source
    from saelab.commands import read_config_file
    from saelab.diffing.crosscoder import Thresholds, diff_crosscoder
    from saelab.diffing.report import write_report
    from saelab.errors import ConfigError, FileFormatError
    from saelab.io.formats import load, read_metadata
    from saelab.report import text_table

    batches = 8 if args.batches is None else args.batches
    if batches < 1:
        raise ConfigError(f"--batches must be at least 1 (got {batches})")
    defaults = Thresholds()
    thresholds = Thresholds(
        defaults.base_max if args.base_max is None else args.base_max,
        defaults.ft_min if args.ft_min is None else args.ft_min,
        defaults.shared if args.shared is None else tuple(args.shared),
        defaults.nu_eps if args.nu_eps is None else args.nu_eps,
        defaults.nu_r if args.nu_r is None else args.nu_r,
    )
    if Path(path).is_file() and Path(path).suffix in (".yaml", ".yml", ".json"):
        import saelab

        saelab.run(read_config_file(path), out=Path(args.out) / "run")
        path = str(Path(args.out) / "run" / "sae")
    sae = load(path)
    if args.source:
        spec = read_config_file(args.source)
        source = parse_source(spec.get("source", spec))
    else:
        try:
            spec = read_metadata(path).get("saelab_source")
        except FileFormatError:
            spec = None
        if not isinstance(spec, dict):
            raise ConfigError(f"{path} does not record its source; pass --source CONFIG")
        source = held_out(spec)
    stream = source.build()
    held = [next(stream) for _ in range(batches)]
    result = diff_crosscoder(sae, held, args.base, args.ft, thresholds)
    paths = write_report(result, Path(args.out), title=f"Crosscoder diff of {path}")
    print(text_table([{"category": k, "latents": v} for k, v in result.counts.items()]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
