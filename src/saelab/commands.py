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

LEADERBOARD_COLUMNS = [
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
    p.add_argument("--steps", type=int, default=800, help="Training steps per SAE (default: 800).")
    p.add_argument("--quick", action="store_true", help="A tiny run for smoke tests (about 10 s).")
    p.add_argument("--seed", type=int, default=0)
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
DEMO_MULTIPLIERS = (0.5, 1.0, 2.0)  # the full demo's sparsity sweep (saelab.sae.registry.sweep_setting)


def demo_plan(steps: int, quick: bool, seed: int) -> tuple[dict, dict, list[dict]]:
    """The default world, training settings and one run per (architecture, sparsity setting)."""
    from saelab.sae.registry import get_class, list_architectures, sweep_setting
    from saelab.toys.worlds import World

    world = {"n_features": 256, "d": 64, "firing_prob": 0.02, "magnitude_std": 0.2, "seed": seed}
    if quick:
        world.update(n_features=64, d=32, firing_prob=0.05)
    true_l0 = World(world).expected_l0
    source = {"type": "toy", "world": world, "batch_size": 256 if quick else 1024, "seed": seed}
    train = {
        "steps": 60 if quick else steps,
        "progress": not quick,
        "lr_warmup_steps": 10 if quick else 50,
        "sparsity_warmup_steps": 10 if quick else 200,
        "seed": seed,
    }
    runs = []
    for arch in list_architectures(one_stream=True):
        base = {"architecture": arch, "d_in": world["d"], "d_sae": world["n_features"], "seed": seed}
        multipliers = (1.0,) if quick or get_class(arch).sweep_parameter is None else DEMO_MULTIPLIERS
        for m in multipliers:
            runs.append({"sae": {**base, **sweep_setting(arch, m, true_l0)}, "default": m == 1.0})
    return source, train, runs


def _demo_worker(job: tuple) -> dict:
    """One demo run in its own process. One thread per process: toy-sized matmuls gain little
    from threads, and several multi-threaded processes on few cores slow each other badly."""
    from saelab.run import run

    name, sae, train, source, out_dir, default = job
    torch.set_num_threads(1)
    (record,) = run({"sae": sae, "train": train, "source": source}, out_dir)
    return {**record, "run": name, "default_setting": default}


def run_demo(args: argparse.Namespace) -> int:
    from saelab.parallel import default_workers, run_jobs
    from saelab.plotting import plot_frontier
    from saelab.sae.registry import get_class

    out = Path(args.out)
    source, train, runs = demo_plan(args.steps, args.quick, args.seed)
    jobs = []
    for run in runs:
        sae = run["sae"]
        knob = get_class(sae["architecture"]).sweep_parameter
        knob = knob if knob in sae else None
        name = sae["architecture"] + (f"_{knob}{sae[knob]:g}" if knob else "")
        jobs.append((name, sae, {**train, "progress": False}, source, str(out / "runs" / name), run["default"]))
    workers = args.jobs or default_workers(len(jobs))
    print(
        f"saelab demo: {len(jobs)} SAEs on a toy world of {source['world']['n_features']} true features "
        f"in {source['world']['d']} dimensions, {workers} at a time -> {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    all_records = []

    def report(record: dict) -> None:
        all_records.append(record)
        print(
            f"  {record['run']:28s} L0 {record['l0']:6.2f}  FVU {record['fvu']:.4f}  "
            f"recovered {record['recovered_fraction']:.2f}  ({record['train_seconds']:.1f}s)",
            flush=True,
        )

    run_jobs(_demo_worker, jobs, workers, report)
    order = {job[0]: i for i, job in enumerate(jobs)}
    all_records.sort(key=lambda r: order[r["run"]])
    # Ground truth is the point of a toy world: rank by true features recovered, then by FVU
    # (FVU alone would crown dense baselines such as PCA, which reconstruct with L0 = d_in).
    leaderboard = sorted(
        (r for r in all_records if r["default_setting"]), key=lambda r: (-r.get("recovered_fraction", 0.0), r["fvu"])
    )
    wall = time.perf_counter() - t0
    write_json(out / "results.json", leaderboard)
    write_json(out / "sweep.json", all_records)
    plot_frontier(all_records, out / "frontier.png", "sparsity / fidelity frontier")
    md = (
        "# saelab demo\n\n"
        f"Toy world: `{json.dumps(source['world'])}`.\n\n"
        "## Leaderboard (default setting of each architecture, sorted by true features recovered, then FVU)\n\n"
        + markdown_table(leaderboard, LEADERBOARD_COLUMNS)
        + "\n## All runs (sparsity sweep)\n\n"
        + markdown_table(all_records, ["run"] + LEADERBOARD_COLUMNS[1:])
        + f"\nWall time: {wall:.1f} s. Frontier plot: `frontier.png`.\n"
    )
    write_text(out / "leaderboard.md", md)
    print()
    print(text_table(leaderboard, LEADERBOARD_COLUMNS))
    print(f"wrote {out}/results.json, leaderboard.md, frontier.png ({wall:.1f} s)")
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
