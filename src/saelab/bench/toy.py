"""`saelab bench toy`: every registered architecture x a set of ground-truth worlds x a sparsity sweep.

Because the true features are known, each run reports not only L0 and FVU but recovery (Hungarian
match, MCC), shrinkage, absorption and hedging (hierarchy), splitting, merging, the nth-decoder-
projection L0 signal, and for the elephant world whether entities or attributes were learned.
Architectures come from the registry and are swept along their own `sweep_parameter` by
`saelab.sae.registry.sweep_setting`, so multiplier > 1 always means "more latents active". Runs
are independent processes with one torch thread each.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from saelab.errors import ConfigError
from saelab.parallel import run_jobs
from saelab.sae.base import describe_validation_error

# Named worlds: (full spec, quick spec). Each is a saelab.toys.worlds spec.
WORLDS: dict[str, tuple[dict, dict]] = {
    "independent": (
        {"kind": "independent", "n_features": 128, "d": 48, "firing_prob": 0.03, "magnitude_std": 0.2},
        {"kind": "independent", "n_features": 48, "d": 24, "firing_prob": 0.06, "magnitude_std": 0.2},
    ),
    "correlated": (
        {
            "kind": "correlated",
            "n_features": 64,
            "d": 64,
            "firing_prob": 0.08,
            "group_size": 4,
            "correlation": 0.7,
            "magnitude_std": 0.15,
        },
        {
            "kind": "correlated",
            "n_features": 32,
            "d": 32,
            "firing_prob": 0.1,
            "group_size": 4,
            "correlation": 0.7,
            "magnitude_std": 0.15,
        },
    ),
    "hierarchical": (
        {
            "kind": "hierarchy",
            "d": 64,
            "n_roots": 12,
            "branching": 3,
            "depth": 2,
            "root_prob": 0.15,
            "child_prob": 0.3,
            "mutually_exclusive": True,
            "magnitude_std": 0.15,
        },
        {
            "kind": "hierarchy",
            "d": 32,
            "n_roots": 8,
            "branching": 2,
            "depth": 2,
            "root_prob": 0.2,
            "child_prob": 0.4,
            "mutually_exclusive": True,
            "magnitude_std": 0.15,
        },
    ),
    "bundle": (
        {
            "kind": "bundle",
            "d": 48,
            "n_attributes": 16,
            "n_entities": 96,
            "attributes_per_entity": 3,
            "entity_prob": 0.03,
            "attribute_prob": 0.1,
            "label_weight": 0.5,
            "magnitude_std": 0.15,
        },
        {
            "kind": "bundle",
            "d": 24,
            "n_attributes": 8,
            "n_entities": 32,
            "attributes_per_entity": 3,
            "entity_prob": 0.06,
            "attribute_prob": 0.15,
            "label_weight": 0.5,
            "magnitude_std": 0.15,
        },
    ),
    "high_interference": (
        {"kind": "independent", "n_features": 256, "d": 32, "firing_prob": 0.01, "magnitude_std": 0.2},
        {"kind": "independent", "n_features": 96, "d": 16, "firing_prob": 0.02, "magnitude_std": 0.2},
    ),
}


class BenchConfig(BaseModel):
    """What `saelab bench toy` runs. Defaults are the full benchmark; `quick()` is the CI size."""

    model_config = ConfigDict(extra="forbid")

    worlds: list[str] = Field(default_factory=lambda: list(WORLDS), description="Named worlds to run.")
    architectures: list[str] | None = Field(
        None, description="Architectures (default: every registered one that trains on one activation stream)."
    )
    multipliers: list[float] = Field(
        [0.5, 1.0, 2.0],
        description="Sparsity sweep, as multiples of the true L0; with matched_l0, the sweep of the "
        "architectures that have neither k nor target_l0.",
    )
    matched_l0: bool = Field(
        False,
        description="Compare every architecture at one L0 (k, target_l0, or a sweep interpolated at it; "
        "see saelab.bench.matched) instead of at its default setting.",
    )
    l0: PositiveFloat | None = Field(
        None, description="With matched_l0: the L0 (default: each world's true L0, rounded)."
    )
    steps: PositiveInt = Field(800, description="Training steps per SAE.")
    batch_size: PositiveInt = Field(512, description="Training batch size.")
    eval_tokens: PositiveInt = Field(4096, description="Held-out tokens for the metrics.")
    seeds: list[int] = Field([0], description="Seeds (each gives its own world instance and SAE init).")
    quick: bool = Field(False, description="Use the small version of every world.")
    tms: bool = Field(True, description="Also train the toy models of superposition and plot their geometry.")
    jobs: NonNegativeInt = Field(0, description="Parallel processes (0: one per CPU core).")

    @field_validator("worlds")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [w for w in v if w not in WORLDS]
        if bad:
            raise ValueError(f"unknown world(s) {bad}; valid worlds: {', '.join(WORLDS)}")
        return v

    @field_validator("multipliers")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(m <= 0 for m in v):
            raise ValueError(f"multipliers must be a non-empty list of positive numbers (got {v})")
        return v

    @classmethod
    def parse(cls, values: dict[str, Any]) -> BenchConfig:
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, cls)) from None

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        return cls.parse(
            {
                "multipliers": [1.0],
                "steps": 200,
                "batch_size": 256,
                "eval_tokens": 2048,
                "quick": True,
                "tms": False,
                **overrides,
            }
        )


# ---------------------------------------------------------------------------- plan
def world_spec(name: str, quick: bool, seed: int) -> dict:
    return {**WORLDS[name][1 if quick else 0], "seed": seed}


def plan(cfg: BenchConfig) -> list[dict]:
    """One job per (seed, world, architecture, sparsity setting): the sweep of `multipliers`, or
    with `matched_l0` the settings that put each architecture at the matched L0."""
    from saelab.bench.matched import matched_settings, target_from
    from saelab.sae.registry import get_class, list_architectures, sweep_setting
    from saelab.toys.worlds import World

    archs = cfg.architectures or list_architectures(one_stream=True)
    for a in archs:
        get_class(a)  # unknown names fail before anything runs
    jobs = []
    for seed in cfg.seeds:
        for wname in cfg.worlds:
            spec = world_spec(wname, cfg.quick, seed)
            world = World(spec)
            target = target_from(world.expected_l0, cfg.l0)
            for arch in archs:
                knob = get_class(arch).sweep_parameter
                if cfg.matched_l0:
                    method, settings = matched_settings(arch, target, cfg.multipliers)
                    if method != "interpolated":
                        points = [(1.0, settings[0])]  # multiplier 1: the one run of a single-run method
                    elif get_class(arch).sweep_kind == "coefficient":
                        points = list(zip(sorted(set(cfg.multipliers)), settings))
                    else:  # a count at a non-integer target: k on either side of it
                        points = [(s[knob] / target, s) for s in settings]
                    extra = {"method": method, "target_l0": target}
                else:
                    points = [
                        (m, sweep_setting(arch, m, world.expected_l0)) for m in (cfg.multipliers if knob else [1.0])
                    ]
                    extra = {}
                for m, setting in points:
                    sae = {"architecture": arch, "d_in": world.d_in, "d_sae": world.n_features, "seed": seed, **setting}
                    jobs.append(
                        {
                            "world": wname,
                            "world_spec": spec,
                            "sae": sae,
                            "knob": knob,
                            "multiplier": m,
                            "seed": seed,
                            "true_l0": world.expected_l0,
                            **extra,
                            "train": {
                                "steps": cfg.steps,
                                "progress": False,
                                "seed": seed,
                                "lr_warmup_steps": min(50, cfg.steps // 10),
                                "sparsity_warmup_steps": min(200, cfg.steps // 5),
                            },
                            "batch_size": cfg.batch_size,
                            "eval_tokens": cfg.eval_tokens,
                        }
                    )
    return jobs


# ---------------------------------------------------------------------------- one run
def held_out(world, seed: int, eval_tokens: int) -> list:
    """The held-out batches every dictionary of a (world, seed) is measured on."""
    gen = torch.Generator().manual_seed(1_000_033 + seed)
    return [world.sample(1024, gen) for _ in range(max(1, eval_tokens // 1024))]


REFERENCE_KEYS = [
    "recovered_fraction",
    "composites_recovered",
    "absorbing_latents",
    "absorbed_parents",
    "absorption",
    "absorption_baseline",
    "hedging",
]


def reference_records(cfg: BenchConfig) -> list[dict]:
    """The trivial baselines of the hierarchy columns: the hand-built true-feature, composite and
    random dictionaries (`saelab.toys.absorption.reference_dictionaries`) on each hierarchy world
    and seed, measured on the same held-out batches as the trained SAEs. No training, so cheap."""
    from saelab.evals.summary import evaluate
    from saelab.toys.absorption import reference_dictionaries
    from saelab.toys.worlds import World

    out = []
    for seed in cfg.seeds:
        for wname in cfg.worlds:
            world = World(world_spec(wname, cfg.quick, seed))
            if not world.parent_child_pairs():
                continue
            held = held_out(world, seed, cfg.eval_tokens)
            for name, sae in reference_dictionaries(world, seed).items():
                rec = evaluate(sae, held, world).as_dict()
                out.append({"world": wname, "dictionary": name, "seed": seed, **{k: rec[k] for k in REFERENCE_KEYS}})
    return out


def run_one(job: dict) -> dict:
    """Train and measure one (world, architecture, setting); errors become a record, not a crash."""
    torch.set_num_threads(1)
    from saelab.bench.matched import convergence
    from saelab.evals.summary import evaluate
    from saelab.sae.registry import create
    from saelab.toys.features import ToySource
    from saelab.toys.worlds import World
    from saelab.train.trainer import TrainConfig, train

    base = {
        "world": job["world"],
        "architecture": job["sae"]["architecture"],
        "knob": job["knob"],
        "setting": job["sae"].get(job["knob"]) if job["knob"] else None,
        "multiplier": job["multiplier"],
        "seed": job["seed"],
        "true_l0": job["true_l0"],
        **{k: job[k] for k in ("method", "target_l0") if k in job},
    }
    try:
        world = World(job["world_spec"])
        sae = create(job["sae"])
        t0 = time.perf_counter()
        result = train(sae, ToySource(world, job["batch_size"], job["seed"]), job["train"])
        seconds = time.perf_counter() - t0
        conv = convergence(result.history, job["train"]["steps"], TrainConfig.parse(job["train"]).lr_decay_fraction)
        held = held_out(world, job["seed"], job["eval_tokens"])
        return {**base, **evaluate(sae, held, world).as_dict(), "train_seconds": seconds, **conv}
    except Exception as exc:  # a variant that cannot train on toy data must not stop the benchmark
        return {**base, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}


# ---------------------------------------------------------------------------- the benchmark
@dataclass
class BenchResult:
    records: list[dict]
    wall_seconds: float
    out: Path | None = None
    tms: dict | None = field(default=None)
    references: list[dict] = field(default_factory=list)  # reference_records: baselines of the hierarchy columns


def run_toy_bench(cfg: BenchConfig | dict | None = None, out: str | Path | None = None, log=print) -> BenchResult:
    """Run the benchmark (from Python or the CLI); with `out`, write the report folder."""
    cfg = cfg if isinstance(cfg, BenchConfig) else BenchConfig.parse(cfg or {})
    jobs = plan(cfg)
    workers = min(len(jobs), cfg.jobs or os.cpu_count() or 1)
    log(
        f"saelab bench toy: {len(jobs)} runs ({len(cfg.worlds)} worlds x {len({j['sae']['architecture'] for j in jobs})} "
        f"architectures x {len(cfg.multipliers)} settings x {len(cfg.seeds)} seeds), {workers} at a time"
    )
    t0 = time.perf_counter()
    records: list[dict] = []

    def done(r: dict) -> None:
        records.append(r)
        if "error" in r:
            log(f"  {r['world']:18s} {r['architecture']:12s} x{r['multiplier']:<4g} ERROR {r['error'][:100]}")
        else:
            log(
                f"  {r['world']:18s} {r['architecture']:12s} x{r['multiplier']:<4g} L0 {r['l0']:6.2f} "
                f"FVU {r['fvu']:.4f} recovered {r['recovered_fraction']:.2f} ({r['train_seconds']:.1f}s)"
            )

    run_jobs(run_one, jobs, workers, done)
    order = {(j["world"], j["sae"]["architecture"], j["multiplier"], j["seed"]): i for i, j in enumerate(jobs)}
    records.sort(key=lambda r: order[(r["world"], r["architecture"], r["multiplier"], r["seed"])])
    references = reference_records(cfg)
    tms = None
    if cfg.tms:
        tms = _run_tms(out, log)
    result = BenchResult(records, time.perf_counter() - t0, Path(out) if out else None, tms, references)
    if out is not None:
        from saelab.bench.report import write_report

        write_report(result, cfg, Path(out))
    return result


def _run_tms(out: str | Path | None, log) -> dict:
    from saelab.toys.tms import phase_diagram, plot_tms, train_tms

    torch.set_num_threads(1)
    log("  toy models of superposition: sparsity sweep and 2-feature phase diagram")
    res = train_tms({"steps": 2000})
    diagram = phase_diagram(steps=1500)
    if out is not None:
        plot_tms(res, diagram, Path(out) / "tms.png")
    return {"geometry": [g.as_dict() for g in res.geometry], "phase_diagram": diagram.as_dict()}
