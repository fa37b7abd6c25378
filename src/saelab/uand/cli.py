"""`saelab uand EXPERIMENT [--quick] [--seed N] [--seeds K] --out DIR`: one subcommand per experiment."""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.errors import ConfigError
from saelab.report import text_table


def register(subparsers) -> None:
    from saelab.uand.experiments import EXPERIMENTS

    listing = "\n".join(f"  {name:<14} {exp.help}" for name, exp in EXPERIMENTS.items())
    parser = subparsers.add_parser(
        "uand",
        help="U-AND lab: computation in superposition experiments",
        description="Train and dissect one-layer models computing every pairwise AND (or any 2-input table) "
        "of sparse boolean inputs; each experiment writes DIR/results.json, plots and DIR/report.md.\n\n"
        f"experiments:\n{listing}\n  {'all':<14} run every experiment into DIR/<name>/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    for name, help_text in [*((n, e.help) for n, e in EXPERIMENTS.items()), ("all", "run every experiment")]:
        sub = experiments.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--quick", action="store_true", help="small sizes: seconds instead of minutes")
        sub.add_argument("--seed", type=int, default=0, help="first seed of data, initialisation and training")
        sub.add_argument(
            "--seeds",
            type=int,
            default=None,
            help="run seeds SEED..SEED+K-1 (default 3); a claim holds only if it holds in every seed",
        )
        sub.add_argument("--out", type=Path, default=None, help="output folder (default runs/uand/EXPERIMENT)")
        sub.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch CPU threads (default 1: these matrices are small, and one thread never oversubscribes "
            "a shared CPU; raise it for large m or d)",
        )
        sub.set_defaults(func=_run)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])


def _run(args: argparse.Namespace) -> int:
    import torch

    from saelab.uand.experiments import run_experiment

    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads}: need at least 1 thread")
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs/uand") / args.experiment
    record = run_experiment(args.experiment, out, quick=args.quick, seed=args.seed, seeds=args.seeds)
    rows = [
        {"experiment": c.get("experiment", args.experiment), "claim": c["name"], "holds": "yes" if c["holds"] else "NO"}
        for c in record["claims"]
    ]
    print(text_table(rows), end="")
    print(f"wrote {out}/results.json and {out}/report.md ({record['wall_s']:.1f} s)")
    return 0
