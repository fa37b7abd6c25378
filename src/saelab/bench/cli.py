"""`saelab bench toy [--quick] --out DIR`."""

from __future__ import annotations

import argparse

from saelab.report import text_table


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="Benchmarks of every architecture against ground truth.")
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    t = sub.add_parser("toy", help="Toy worlds x registered architectures x a sparsity sweep, with pathology metrics.")
    t.add_argument("--out", default="runs/bench_toy", help="Report folder (default: runs/bench_toy).")
    t.add_argument("--quick", action="store_true", help="Small worlds and short runs for CI (under 2 minutes).")
    t.add_argument("--worlds", nargs="+", help="Subset of worlds (default: all).")
    t.add_argument("--architectures", nargs="+", help="Subset of architectures (default: every registered one).")
    t.add_argument("--steps", type=int, help="Training steps per SAE.")
    t.add_argument("--seeds", type=int, nargs="+", help="Seeds (default: 0).")
    t.add_argument(
        "--multipliers", type=float, nargs="+", help="Sparsity settings as multiples of the true L0 (default: 0.5 1 2)."
    )
    t.add_argument("--jobs", type=int, default=0, help="Parallel single-thread processes (default: one per core).")
    t.add_argument(
        "--matched-l0",
        action="store_true",
        help="Compare every architecture at each world's true L0 (k, target_l0, or an interpolated sweep).",
    )
    t.add_argument("--l0", type=float, help="With --matched-l0: the L0 to compare at (default: the true L0, rounded).")
    t.add_argument("--no-tms", action="store_true", help="Skip the toy models of superposition section.")
    t.set_defaults(func=run_bench_toy)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_bench_toy(args: argparse.Namespace) -> int:
    from saelab.bench.report import default_rows, matched_table_rows
    from saelab.bench.toy import BenchConfig, run_toy_bench

    overrides = {
        k: v
        for k, v in {
            "worlds": args.worlds,
            "architectures": args.architectures,
            "steps": args.steps,
            "seeds": args.seeds,
            "multipliers": args.multipliers,
            "jobs": args.jobs,
            "l0": args.l0,
        }.items()
        if v is not None
    }
    if args.no_tms:
        overrides["tms"] = False
    if args.matched_l0:
        overrides["matched_l0"] = True
    cfg = BenchConfig.quick_config(**overrides) if args.quick else BenchConfig.parse(overrides)
    result = run_toy_bench(cfg, args.out)
    if cfg.matched_l0:  # matched rows first (ranked), per world
        rows = sorted(matched_table_rows(result.records), key=lambda r: (r["world"], not r["matched"]))
    else:
        rows = sorted(default_rows(result.records), key=lambda r: (r["world"], -r["recovered_fraction"]))
    print()
    print(
        text_table(
            rows,
            [
                "world",
                "architecture",
                "l0",
                "fvu",
                "recovered_fraction",
                "composites_recovered",
                "mcc",
                "shrinkage",
                "absorption",
                "hedging",
                "splitting",
                "merging",
            ],
        )
    )
    print(f"wrote {args.out}/results.json, report.md, report.html and plots ({result.wall_seconds:.1f} s)")
    return 0
