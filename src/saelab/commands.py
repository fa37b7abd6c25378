"""`saelab demo`, `saelab train CONFIG` and `saelab eval PATH`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError, SaelabWarning, TrainingInterrupted
from saelab.io.atomic import write_json, write_text
from saelab.report import markdown_table, text_table
from saelab.train.distributed import DEFAULT_TIMEOUT_S

LEADERBOARD_COLUMNS = [  # what `saelab train` prints
    "architecture",
    "l0",
    "fvu",
    "dead_fraction",
    "dense_fraction",
    "shrinkage",
    "mmcs_decoder",
    "mmcs_encoder",
    "recovered_fraction",
    "train_seconds",
]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Train every architecture on a ground-truth toy world and compare them.")
    p.add_argument("--out", default="runs/demo", help="Run folder (default: runs/demo).")
    p.add_argument("--steps", type=int, default=1500, help="Training steps per SAE (default: 1500).")
    p.add_argument("--quick", action="store_true", help="A tiny run for smoke tests (about 10 s).")
    p.add_argument("--seed", type=int, default=0, help="First seed (default: 0).")
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"Seeds to average over (default: {DEMO_SEEDS}).")
    p.add_argument("--l0", type=float, help="The L0 every architecture is compared at (default: the true L0, rounded).")
    p.add_argument(
        "--sweep",
        type=float,
        nargs="+",
        help="Sweep multipliers for architectures without k or target_l0 (default: 0.25 0.5 1; >1: more latents).",
    )
    p.add_argument(
        "--jobs", type=int, default=0, help="Parallel training processes, one thread each (default: one per CPU core)."
    )
    p.set_defaults(func=run_demo)

    p = subparsers.add_parser("train", help="Train SAEs from a YAML or JSON config.")
    p.add_argument("config", help="YAML/JSON with `sae` (or `saes`), `train` and `source` sections.")
    p.add_argument("--out", help="Run folder (overrides `out` in the config). Resumes if it has a checkpoint.")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"Under torchrun: how long a rank waits for the others before failing (default: {DEFAULT_TIMEOUT_S:g}).",
    )
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("eval", help="Metrics of a saved SAE on a source.")
    p.add_argument("path", help="SAE folder (SAELens layout).")
    p.add_argument("--source", help="YAML/JSON source config (default: the source the SAE was trained on).")
    p.add_argument("--batches", type=int, default=8, help="Evaluation batches (default: 8).")
    p.add_argument("--out", help="Folder for results.json.")
    p.set_defaults(func=run_eval)


# ---------------------------------------------------------------------------- config files
def read_config_file(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; give a YAML or JSON config") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if kind == "JSON" else yaml.load(text, _yaml_loader())
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: the key {exc.args[0]!r} appears twice in one mapping; keep one") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        message = " ".join(str(exc).split())  # one line
        raise ConfigError(f"{path} is not valid {kind}: {message}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with `sae`, `train` and `source` sections")
    return data


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load, except that a key given twice in one mapping is an error, not the last one silently."""

        def construct_mapping(self, node, deep=False):
            keys = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in keys
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if duplicate:
                    raise _DuplicateKey(key)
                keys.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


# ---------------------------------------------------------------------------- demo
DEMO_SEEDS = 3
DEMO_PARTS = 4  # sweeps per seed, each training its share of the SAEs on one stream (--quick: one)


def demo_plan(
    steps: int,
    quick: bool,
    seed: int,
    seeds: int = DEMO_SEEDS,
    l0: float | None = None,
    sweep: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """The demo's world, training settings, the L0 every architecture is compared at, and one run
    per (seed, architecture, setting) that brings it there (`saelab.bench.matched`). Each seed
    draws its own world, data and initialisations."""
    from saelab.bench.matched import SWEEP_MULTIPLIERS, matched_settings, target_from
    from saelab.sae.registry import get_class, list_architectures
    from saelab.toys.worlds import World

    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1 (got {steps})")
    world = {"n_features": 256, "d": 64, "firing_prob": 0.02, "magnitude_std": 0.2}
    if quick:
        world.update(n_features=64, d=32, firing_prob=0.05)
    true_l0 = World({**world, "seed": seed}).expected_l0
    target = target_from(true_l0, l0)
    steps = 60 if quick else steps
    batch = 128 if quick else 256
    train = {
        "steps": steps,
        "lr": 3e-3,  # one rate for every architecture, high enough to reach a plateau in the demo's budget
        "progress": False,
        "lr_warmup_steps": 10 if quick else 50,
        "sparsity_warmup_steps": 10 if quick else 200,
        "log_every": max(1, steps // 60),  # enough FVU records for the convergence windows
        "norm_estimation_batches": 8 if quick else 32,  # 8192 rows for the init and the fitted baselines
    }
    runs = []
    for s in range(seed, seed + seeds):
        for arch in list_architectures(one_stream=True):
            method, settings = matched_settings(arch, target, sweep or SWEEP_MULTIPLIERS)
            knob = get_class(arch).sweep_parameter
            for setting in settings:
                value = setting.get(knob, setting.get("target_l0"))
                name = arch + (f"_{knob}{value:g}" if method == "interpolated" else "")
                sae = {"architecture": arch, "d_in": world["d"], "d_sae": world["n_features"], "seed": s, **setting}
                runs.append(
                    {"seed": s, "name": name, "architecture": arch, "method": method, "target_l0": target, "sae": sae}
                )
    return {
        "world": world,
        "true_l0": true_l0,
        "target_l0": target,
        "batch_size": batch,
        "eval_batches": 8 if quick else 32,
        "train": train,
        "seeds": list(range(seed, seed + seeds)),
        "runs": runs,
    }


def demo_source(plan: dict[str, Any], seed: int) -> dict[str, Any]:
    """The training source of one seed: its own world and its own stream."""
    return {"type": "toy", "world": {**plan["world"], "seed": seed}, "batch_size": plan["batch_size"], "seed": seed}


def demo_jobs(plan: dict[str, Any], out: Path, parts: int = DEMO_PARTS) -> list[tuple]:
    """The plan's runs as training jobs: each seed's runs dealt into `parts` sweeps, each trained
    from one pass over that seed's stream (`saelab.run` with `saes`), in `out/runs/seed<S>-<part>`."""
    jobs = []
    for seed in plan["seeds"]:
        runs = [r for r in plan["runs"] if r["seed"] == seed]
        for part in range(min(parts, len(runs))):
            members = runs[part::parts]
            train = {**plan["train"], "seed": seed}
            folder = out / "runs" / f"seed{seed}-{part}"
            jobs.append((members, train, demo_source(plan, seed), plan["eval_batches"], str(folder)))
    return jobs


def _demo_worker(job: tuple) -> list[dict]:
    """One demo sweep in its own process. One thread per process: toy-sized matmuls gain little
    from threads, and several multi-threaded processes on few cores slow each other badly."""
    from saelab.bench.matched import convergence
    from saelab.run import run

    members, train, source, eval_batches, folder = job
    torch.set_num_threads(1)
    config = {
        "saes": [{**m["sae"], "name": m["name"]} for m in members],
        "train": train,
        "source": source,
        "eval": {"batches": eval_batches},
    }
    records = run(config, folder)
    out = []
    for member, record in zip(members, records):
        log = Path(folder) / member["name"] / "metrics.jsonl"
        history = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        conv = convergence(history, train["steps"], 0.2) if history else {"converged": None, "fvu_change": None}
        out.append(
            {
                "run": member["name"],
                "seed": member["seed"],
                "method": member["method"],
                "target_l0": member["target_l0"],
                **{k: v for k, v in record.items() if k != "name"},
                **conv,
            }
        )
    return out


DEMO_COLUMNS = ["architecture", "method", "L0", "recovered", "FVU", "mmcs_decoder", "shrinkage", "dead", "converged"]


def _demo_cells(row: dict) -> dict:
    from saelab.bench.matched import pm

    return {
        "architecture": row["architecture"],
        "method": row["method"],
        "L0": pm(row, "l0", 2),
        "recovered": pm(row, "recovered_fraction"),
        "FVU": pm(row, "fvu"),
        "mmcs_decoder": pm(row, "mmcs_decoder"),
        "shrinkage": pm(row, "shrinkage"),
        "dead": pm(row, "dead_fraction"),
        "converged": f"{row['converged_seeds']}/{row['n_seeds']}" if row["convergence_known"] else "n/a",
    }


def _why_unmatched(row: dict) -> str:
    if row["method"] == "none":
        return "no sparsity setting (a dense baseline)"
    if row["method"] == "interpolated":
        lows = [min(r["sweep_l0"]) for r in row["per_seed"]]
        highs = [max(r["sweep_l0"]) for r in row["per_seed"]]
        return (
            f"not bracketed on {row['n_seeds'] - row['matched_seeds']}/{row['n_seeds']} seeds "
            f"(sweep L0 {min(lows):.2f} to {max(highs):.2f})"
        )
    l0s = ", ".join(f"{r['l0']:.2f}" for r in row["per_seed"])
    return f"L0 off the target by more than 10% on {row['n_seeds'] - row['matched_seeds']} seed(s) (L0 {l0s})"


def demo_leaderboard(plan: dict[str, Any], rows: list[dict], records: list[dict], wall: float) -> str:
    """leaderboard.md: how the comparison was made, the matched ranking, what could not be
    matched and why, and every run."""
    from saelab.bench.matched import CONVERGENCE_TOLERANCE, CONVERGENCE_WINDOW, L0_TOLERANCE

    t, train = plan["target_l0"], plan["train"]
    methods: dict[str, list[str]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r["architecture"])
    how = {
        "k": f"k = {t:g} active latents by construction",
        "target_l0": f"trained to `target_l0 = {t:g}` (the sparsity coefficient adapts)",
        "interpolated": "a sweep of the sparsity setting, each metric interpolated at the target "
        "(linear in log L0 between the two bracketing runs; never extrapolated)",
        "none": "no sparsity setting: not comparable at a fixed L0, shown for reference",
    }
    decay = train.get("lr_decay_fraction", 0.2)
    matched = [r for r in rows if r["matched"]]
    unmatched = [r for r in rows if not r["matched"]]
    lines = [
        "# saelab demo\n",
        f"Toy world: `{json.dumps(plan['world'])}` (true L0 {plan['true_l0']:.2f}), one world per seed. "
        f"Every architecture is compared at **L0 = {t:g}**.\n",
        "How the comparison was made:\n",
        *[f"- **{m}** ({how[m]}): {', '.join(a)}" for m, a in methods.items()],
        f"- Seeds {plan['seeds']}: each seed draws its own world (feature directions), data stream and "
        "SAE initialisation; tables give the mean ± standard deviation over seeds.",
        f"- Training: {train['steps']} steps of {plan['batch_size']} tokens, Adam lr {train['lr']:g} for every "
        f"architecture ({train['lr_warmup_steps']} warm-up steps, linear decay over the last {decay:.0%}).",
        f"- Matched: the single-run methods when L0 is within {L0_TOLERANCE:.0%} of the target, the sweeps "
        "when bracketed.",
        f"- Converged: the FVU of fresh batches (logged every {train['log_every']} steps before their update), "
        f"averaged over the last {CONVERGENCE_WINDOW:.0%} of the steps before the decay, moved less than "
        f"{CONVERGENCE_TOLERANCE:.0%} from its average over the {CONVERGENCE_WINDOW:.0%} before; "
        "`converged` counts the seeds that met it (a sweep needs every run of it).",
        f"- Held-out metrics on {plan['eval_batches'] * plan['batch_size']} fresh tokens per run; recovered: "
        "true features with a latent of decoder cosine >= 0.9.\n",
        f"## Leaderboard at L0 = {t:g} (sorted by true features recovered, then FVU)\n",
        "Differences smaller than the spreads are not resolved by this many seeds.\n",
        markdown_table([_demo_cells(r) for r in matched], DEMO_COLUMNS),
        f"## Not compared at L0 = {t:g}\n",
        markdown_table(
            [{**_demo_cells(r), "why": _why_unmatched(r)} for r in unmatched],
            ["architecture", "method", "why", "L0", "recovered", "FVU"],
        )
        if unmatched
        else "(none)\n",
        "## All runs\n",
        markdown_table(
            [{**r, **({"converged": "n/a", "fvu_change": ""} if r["converged"] is None else {})} for r in records],
            [
                "run",
                "seed",
                "l0",
                "fvu",
                "recovered_fraction",
                "mmcs_decoder",
                "dead_fraction",
                "converged",
                "fvu_change",
            ],
        ),
        f"Wall time: {wall:.1f} s. Frontier plot (runs averaged over seeds): `frontier.png`.\n",
    ]
    return "\n".join(lines)


def _frontier_points(records: list[dict]) -> list[dict]:
    """Each run averaged over seeds: one point per (architecture, setting) for the frontier plot."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["run"], []).append(r)
    points = []
    for rs in groups.values():
        p = {"architecture": rs[0]["architecture"]}
        for m in ("l0", "fvu", "recovered_fraction"):
            p[m] = sum(r[m] for r in rs) / len(rs)
        points.append(p)
    return points


def run_demo(args: argparse.Namespace) -> int:
    from saelab.bench.matched import matched_rows, rank
    from saelab.parallel import default_workers, run_jobs
    from saelab.plotting import plot_frontier

    out = Path(args.out)
    sweep = tuple(args.sweep) if args.sweep else None
    plan = demo_plan(args.steps, args.quick, args.seed, args.seeds, args.l0, sweep)
    jobs = demo_jobs(plan, out, 1 if args.quick else DEMO_PARTS)  # quick: start-up costs dominate
    workers = args.jobs or default_workers(len(jobs))
    world = plan["world"]
    print(
        f"saelab demo: {len(plan['runs'])} SAEs ({len(plan['seeds'])} seeds) on toy worlds of {world['n_features']} "
        f"true features in {world['d']} dimensions, compared at L0 = {plan['target_l0']:g}; "
        f"{len(jobs)} sweeps, {workers} at a time -> {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    records: list[dict] = []

    def report(batch: list[dict]) -> None:
        records.extend(batch)
        for r in batch:
            print(
                f"  seed {r['seed']} {r['run']:30s} L0 {r['l0']:6.2f}  FVU {r['fvu']:.4f}  "
                f"recovered {r['recovered_fraction']:.2f}",
                flush=True,
            )

    run_jobs(_demo_worker, jobs, workers, report)
    order = {(r["seed"], r["name"]): i for i, r in enumerate(plan["runs"])}
    records.sort(key=lambda r: order[(r["seed"], r["run"])])
    rows = rank(matched_rows(records))
    wall = time.perf_counter() - t0
    write_json(out / "results.json", rows)
    write_json(out / "sweep.json", records)
    plot_frontier(
        _frontier_points(records),
        out / "frontier.png",
        "sparsity / fidelity frontier",
        true_l0=plan["target_l0"],
        l0_label=f"matched L0 = {plan['target_l0']:g}",
    )
    write_text(out / "leaderboard.md", demo_leaderboard(plan, rows, records, wall))
    print()
    print(text_table([_demo_cells(r) for r in rows if r["matched"]], DEMO_COLUMNS))
    print(f"wrote {out}/results.json, sweep.json, leaderboard.md, frontier.png ({wall:.1f} s)")
    return 0


# ---------------------------------------------------------------------------- train / eval
def run_train(args: argparse.Namespace) -> int:
    """Under `torchrun --nproc_per_node N` the ranks train each SAE data-parallel; rank 0 writes."""
    from saelab.io.lock import run_lock
    from saelab.run import RunConfig, run
    from saelab.train import distributed

    cfg = RunConfig.parse(read_config_file(args.config))
    out = Path(args.out or cfg.out or "runs/train")
    started = distributed.init_from_env(cfg.train.device, args.dist_timeout)
    try:
        if started and cfg.saes is not None:
            raise ConfigError(
                "a sweep (`saes`) trains in one process; run it without torchrun, or launch one `sae` per run"
            )
        main = distributed.is_main()
        with one_line_warnings("train"), run_lock(out) if main else contextlib.nullcontext():
            records = run(cfg, out)
            if main:
                write_json(out / "results.json", records)
    except TrainingInterrupted as exc:
        if distributed.is_main():
            print(f"saelab train: {exc}", file=sys.stderr)
        return 128 + exc.signal  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    finally:
        if started:
            distributed.shutdown()
    if not main:
        return 0
    print(text_table(records, [c for c in ["name"] + LEADERBOARD_COLUMNS if c in records[0]]))
    return 0


@contextlib.contextmanager
def one_line_warnings(command: str):
    """saelab's own warnings (a damaged checkpoint skipped, ...) as `saelab CMD: warning: ...` lines."""
    show = warnings.showwarning

    def shown(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SaelabWarning):
            print(f"saelab {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = shown
    try:
        yield
    finally:
        warnings.showwarning = show


def run_eval(args: argparse.Namespace) -> int:
    from saelab.activations.factory import held_out, parse_source
    from saelab.errors import FileFormatError
    from saelab.evals.summary import evaluate
    from saelab.io.formats import load, read_metadata
    from saelab.run import EvalConfig

    sae = load(args.path)  # any known format
    if args.source:
        spec = read_config_file(args.source)
        source = parse_source(spec.get("source", spec))
    else:
        try:
            spec = read_metadata(args.path).get("saelab_source")
        except FileFormatError:  # another library's folder: it cannot name a saelab source
            spec = None
        if not isinstance(spec, dict):
            raise ConfigError(f"{args.path} does not record its source; pass --source CONFIG")
        source = held_out(spec)  # the training source reseeded: batches it never trained on
    n = EvalConfig.parse({"batches": args.batches}).batches
    source = source.build()
    if source.d_in != sae.cfg.d_in:
        raise ConfigError(f"the source has d_in={source.d_in} but the SAE has d_in={sae.cfg.d_in}")
    record = {
        "path": str(args.path),
        "architecture": sae.architecture,
        **evaluate(sae, [next(source) for _ in range(n)], getattr(source, "world", None)).as_dict(),
    }
    if args.out:
        write_json(Path(args.out) / "results.json", record)
    printable = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    print(text_table([printable]))
    return 0
