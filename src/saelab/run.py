"""One run pipeline: a typed run config -> the one training loop -> one evaluation record -> files.

`RunConfig` describes a whole run: one dictionary (`sae`) or several trained on one stream
(`saes`), the training settings, a typed source, an optional held-out source and the evaluation
settings. `run(config, out)` trains, evaluates every dictionary on the same held-out batches and
saves each one; `saelab train`, `saelab demo` and the benchmarks are thin plans over it, and the
Python API is the same function:

    import saelab
    records = saelab.run({"sae": {"architecture": "topk", "d_in": 64, "d_sae": 256, "k": 5},
                          "source": {"type": "world", "world": {"d": 64}}}, out="runs/x")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationError, field_validator

from saelab.activations.factory import SourceConfig, held_out, parse_source
from saelab.config import StrictModel, describe_validation_error
from saelab.errors import ConfigError
from saelab.train.trainer import TrainConfig, TrainResult


class DownstreamEvalConfig(StrictModel):
    """Splice each trained dictionary into its model (model and cache sources): CE loss recovered,
    KL(p_clean || p_spliced) and top-1 agreement, under `downstream` in results.json."""

    rows: PositiveInt = Field(32, description="Text rows (context_size tokens each) of the spliced forwards.")
    skip_docs: NonNegativeInt = Field(
        0, description="Start this many documents into the held-out source's text (text it did not train on)."
    )
    per_site: bool = Field(True, description="Crosscoders and CLTs: also splice each site alone.")


class EvalConfig(StrictModel):
    """How a trained dictionary is scored."""

    batches: PositiveInt = Field(8, description="Held-out batches behind every metric in results.json.")
    downstream: DownstreamEvalConfig | None = Field(
        None,
        description="Downstream (spliced) evaluation on a real model: a mapping of settings, or true for the defaults.",
    )

    @field_validator("downstream", mode="before")
    @classmethod
    def _on_off(cls, v):
        if v is True:
            return DownstreamEvalConfig()
        if v is False:
            return None
        if isinstance(v, dict):  # its own errors name its own keys
            return DownstreamEvalConfig.parse(v)
        return v


class RunConfig(StrictModel):
    """A whole run. Exactly one of `sae` (a mapping) and `saes` (a list, trained as one sweep)."""

    sae: dict[str, Any] | None = Field(None, description="One dictionary's config (at least `architecture`).")
    saes: list[dict[str, Any]] | None = Field(None, description="Several dictionaries trained on one stream.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    source: SourceConfig = Field(default_factory=lambda: parse_source(None), description="Training data.")
    eval_source: SourceConfig | None = Field(None, description="Held-out data (default: the source, reseeded).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    out: str | None = Field(None, description="Run folder (the CLI's --out wins).")

    @classmethod
    def parse(cls, values: Any) -> RunConfig:
        """Validate a whole config; each section's errors carry its name (`train: 'steps': ...`)."""
        if isinstance(values, RunConfig):
            return values
        if not isinstance(values, dict):
            raise ConfigError("a run config must be a mapping with `sae` (or `saes`), `train` and `source` sections")
        unknown = set(values) - set(cls.model_fields)
        if unknown:
            raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; valid: {', '.join(cls.model_fields)}")
        values = dict(values)
        if ("sae" in values) == ("saes" in values):
            raise ConfigError(
                "the config needs either an `sae` mapping or an `saes` list (a sweep), not both or neither"
            )
        if "sae" in values and not isinstance(values["sae"], dict):
            raise ConfigError("`sae` must be a mapping with at least `architecture` (use `saes` for a list)")
        if "saes" in values and not isinstance(values["saes"], list):
            raise ConfigError("`saes` must be a list of SAE configs (each a mapping with at least `architecture`)")
        for name, parse in (("train", TrainConfig.parse), ("eval", EvalConfig.parse)):
            section = values.get(name)
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"`{name}` must be a mapping of settings, got {type(section).__name__}")
            try:
                values[name] = parse(section or {})
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        values["source"] = parse_source(values.get("source"))
        if values.get("eval_source") is not None:
            values["eval_source"] = parse_source(values["eval_source"], "eval_source")
        if "saes" in values:
            for i, entry in enumerate(values["saes"]):
                if not isinstance(entry, dict):
                    raise ConfigError(f"saes[{i}] must be a mapping with at least `architecture`, got {entry!r:.40}")
        if values["eval"].downstream is not None:
            kind = (values.get("eval_source") or values["source"]).type
            if kind not in ("model", "cache"):
                raise ConfigError(
                    f"eval: downstream splices the dictionary into a model, but the held-out source is a "
                    f"{kind!r} source; use a model or cache source, or drop eval.downstream"
                )
        if values.get("out") is not None and not isinstance(values["out"], str):
            raise ConfigError(f"`out` must be a folder path, got {values['out']!r}")
        try:
            return cls.model_validate(values, strict=False)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, cls)) from None

    @field_validator("source", "eval_source", mode="before")
    @classmethod
    def _typed_source(cls, v):
        return v if v is None else parse_source(v)


def run(config: RunConfig | dict, out: str | Path | None = None) -> list[dict[str, Any]]:
    """Train every dictionary of `config`, evaluate each on the same held-out batches, and save it
    (to OUT/sae for one, OUT/<name>/sae for several). Returns one flat record per dictionary.

    The run holds OUT's lock from start to end (a second run on the same folder is refused), its
    checkpoints record the source and held-out source (resuming on other data is refused), and
    SIGINT/SIGTERM stop it with a checkpoint written (`TrainingInterrupted`)."""
    from saelab.io.lock import run_lock
    from saelab.train import distributed

    cfg = RunConfig.parse(config)
    out = Path(out or cfg.out or "runs/train")
    if not distributed.is_main():  # data-parallel: rank 0 holds the lock, evaluates and saves
        _train(cfg, out)
        return []
    with run_lock(out):
        return _run(cfg, out)


def _train(cfg: RunConfig, out: Path, source: Any = None) -> dict[str | None, TrainResult]:
    from saelab.train.trainer import train, train_many

    spec = {"source": cfg.source.spec(), "eval_source": held_out(cfg.source, cfg.eval_source).spec()}
    if cfg.train.objective is not None:
        return _train_e2e(cfg, out, spec)
    source = source if source is not None else cfg.source.build()
    if cfg.sae is not None:
        return {None: train(with_widths(cfg.sae, source), source, cfg.train, out, source_config=spec)}
    return train_many([with_widths(e, source) for e in cfg.saes], source, cfg.train, out, source_config=spec)


def e2e_spec(cfg: RunConfig) -> dict[str, Any]:
    """The model-source settings an end-to-end run reads (one model, one hookpoint), checked."""
    spec = cfg.source.model_dump(exclude_none=True)
    if spec.get("type") != "model" or spec.get("model") is None:
        raise ConfigError(
            "train.objective e2e runs the model itself: the source must be `type: model` with one `model` "
            "(not `models`) and one `hookpoint`"
        )
    if not isinstance(spec.get("hookpoint"), str) or spec.get("target_hookpoint"):
        raise ConfigError("train.objective e2e: give the source one `hookpoint` (the SAE's), no target_hookpoint")
    if spec.get("cache_dir"):
        raise ConfigError("train.objective e2e needs the model's outputs on every step; drop source.cache_dir")
    return spec


def _train_e2e(cfg: RunConfig, out: Path, described: dict[str, Any]) -> dict[str | None, TrainResult]:
    """End-to-end training (train.objective): each step takes `model_batch_size` rows (default 8) of
    `context_size` tokens (default 128) of the source's text, in order (see saelab.train.e2e)."""
    from saelab.models.source import _load_all
    from saelab.train.e2e import E2EObjective, E2ESource
    from saelab.train.trainer import train, train_many

    spec = e2e_spec(cfg)
    model, tokenizer, _ = _load_all(spec)
    objective = E2EObjective(model, spec["hookpoint"], cfg.train.objective)
    try:
        source = E2ESource(
            model,
            tokenizer,
            spec.get("data", "pydoc"),
            spec["hookpoint"],
            cfg.train.objective.downstream,
            rows_per_batch=spec.get("model_batch_size", 8),
            repeat=spec.get("repeat", False),
            **{
                k: spec[k] for k in ("context_size", "column", "packing", "prepend_bos", "exclude_special") if k in spec
            },
        )
        if cfg.sae is not None:
            return {None: train(with_widths(cfg.sae, source), source, cfg.train, out, described, objective)}
        saes = [with_widths(e, source) for e in cfg.saes]
        return train_many(saes, source, cfg.train, out, described, objective)
    finally:
        objective.release()


def e2e_record(cfg: RunConfig, sae: Any) -> dict[str, Any]:
    """The end-to-end row (saelab.evals.e2e) of a trained dictionary on `eval.batches` held-out
    batches of `model_batch_size` rows: CE increase, KL(p_clean || p_spliced), L0, alive latents and
    explained variance at the hookpoint and downstream. Without an `eval_source` the rows come
    after those training read, when the text is long enough (else from its start)."""
    from saelab.evals.e2e import e2e_report
    from saelab.models.source import _load_all
    from saelab.models.text import TokenRows, load_texts, special_ids

    spec = e2e_spec(cfg)
    held = held_out(cfg.source, cfg.eval_source).model_dump(exclude_none=True)
    model, tokenizer, _ = _load_all(spec)
    rows = TokenRows(
        load_texts(held.get("data", "pydoc"), held.get("column") or "text"), tokenizer, held.get("context_size") or 128
    )
    n = spec.get("model_batch_size", 8)
    if cfg.eval_source is None:  # the same text: start after the rows training read (if the text has more)
        for _ in range(cfg.train.steps):
            if rows.next_rows(n) is None:
                rows.restart()  # a short text: the evaluation reads rows training saw
                break
    batches = [b for b in (rows.next_rows(n) for _ in range(cfg.eval.batches)) if b]
    specials = special_ids(tokenizer) if spec.get("exclude_special", True) else None
    row = e2e_report({"sae": sae}, model, spec["hookpoint"], batches, cfg.train.objective.downstream, specials)[0]
    record = {f"e2e_{k}": v for k, v in row.to_dict().items() if k not in ("name", "hookpoint")}
    for site, ev in record.pop("e2e_downstream_explained_variance").items():
        record[f"e2e_explained_variance.{site}"] = ev
    return record


def with_widths(entry: dict[str, Any], source: Any) -> dict[str, Any]:
    """An SAE config with `d_in` (and a transcoder's `d_out`) taken from the source when not given:
    the width of the site(s) it reads (and writes), or the source's own d_in."""
    widths = getattr(source, "site_widths", None) or {}
    entry = dict(entry)
    site = entry.get("site")
    if "d_in" not in entry:
        names = site if isinstance(site, list) else [site] if site is not None else []
        if names and all(isinstance(n, str) and n in widths for n in names):
            entry["d_in"] = sum(widths[n] for n in names)
        elif not names and isinstance(getattr(source, "d_in", None), int) and source.d_in > 0:
            entry["d_in"] = source.d_in
    write = entry.get("write_site")
    if "d_out" not in entry and isinstance(write, str) and write in widths:
        entry["d_out"] = widths[write]
    return entry


def _run(cfg: RunConfig, out: Path) -> list[dict[str, Any]]:
    from saelab.sae.registry import make_config

    # An end-to-end run builds its own source from the model (`_train_e2e`); the generic one would
    # cost a probe forward for nothing.
    source = cfg.source.build() if cfg.train.objective is None else None
    early = None
    if cfg.eval_source is not None:  # separate data: check its widths before hours of training
        early = held_out_batches(cfg)
        for entry in [cfg.sae] if cfg.sae is not None else cfg.saes:
            if early[0] and source is not None:
                check_fits(make_config(_without_run_keys(with_widths(entry, source))), early[0][0], "eval_source")
    t0 = time.perf_counter()
    results = _train(cfg, out, source)
    seconds = time.perf_counter() - t0
    batches, world = early or held_out_batches(cfg)
    records = []
    for name, result in results.items():
        folder = out if name is None else out / name
        record = evaluate_and_save(result, seconds, batches, world, cfg.source.spec(), folder)
        if cfg.train.objective is not None:
            record.update(e2e_record(cfg, result.sae))
        if cfg.eval.downstream is not None:
            record["downstream"] = downstream_record(result.sae, cfg)
        records.append(record if name is None else {"name": name, **record})
    return records


def _without_run_keys(entry: dict[str, Any]) -> dict[str, Any]:
    """A sweep member's SAE config without the keys only the run reads (`name`, `train`)."""
    return {k: v for k, v in entry.items() if k not in ("name", "train")}


def check_fits(sae_cfg: Any, batch: Any, where: str) -> None:
    """A batch from `where` must hold what the dictionary reads and writes, at its widths."""
    view = batch.view(sae_cfg.read_sites, sae_cfg.write_sites if sae_cfg.is_transcoder else None)
    for name, t, width in (("d_in", view.x, sae_cfg.d_in), ("d_out", view.target, sae_cfg.output_width)):
        if t.shape[-1] != width:
            raise ConfigError(
                f"the {where} yields {name}={t.shape[-1]} but the SAE has {name}={width}; "
                "give a held-out source with the training data's sites and widths"
            )


def held_out_batches(cfg: RunConfig) -> tuple[list, Any]:
    """`cfg.eval.batches` fresh batches from the held-out source, and its ground-truth world
    (None for real data)."""
    source = held_out(cfg.source, cfg.eval_source).build()
    batches = []
    for i in range(cfg.eval.batches):
        try:
            batches.append(next(source))
        except StopIteration:
            raise ConfigError(
                f"the held-out source ran out after {i} batches; eval.batches is {cfg.eval.batches}: "
                "lower it or give more held-out data"
            ) from None
    return batches, getattr(source, "world", None)


def downstream_record(sae, cfg: RunConfig) -> dict[str, Any]:
    """`eval.downstream`: the dictionary spliced into the held-out source's model(s), on its text."""
    from saelab.evals.splice import fidelity_from_spec, model_source_spec

    d = cfg.eval.downstream
    spec = model_source_spec(held_out(cfg.source, cfg.eval_source).spec())
    if not spec:
        raise ConfigError("eval: downstream needs a model or cache source, which names the model to splice into")
    return fidelity_from_spec(sae, spec, d.rows, d.skip_docs, d.per_site)


def evaluate_and_save(
    result: TrainResult, seconds: float, batches: list, world: Any, source_spec: dict, folder: Path
) -> dict[str, Any]:
    """The evaluation record of a trained dictionary; the SAE goes to `folder/sae`."""
    from saelab.evals.summary import evaluate
    from saelab.io.formats import save  # SAELens v6 layout, or saelab's for what it cannot hold

    sae = result.sae
    if batches:
        check_fits(sae.cfg, batches[0], "held-out source")
    record = {
        "architecture": sae.architecture,
        **({sae.sweep_parameter: getattr(sae.cfg, sae.sweep_parameter)} if sae.sweep_parameter else {}),
        **evaluate(sae, batches, world).as_dict(),
        "train_seconds": seconds,
        "train_steps": result.steps,
        "train_tokens": result.tokens,
        "path": str(folder / "sae"),
    }
    save(
        sae, folder / "sae", sparsity=result.latent_stats.frequencies().float(), metadata={"saelab_source": source_spec}
    )
    return record
