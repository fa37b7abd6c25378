"""Stage-wise model diffing: fine-tune one dictionary through data and model changes and read
which latents rotate (Bricken et al., Anthropic, Dec 2024).

Stages, each a (model, data) pair (`STAGE_DATA`):

- **S**: trained from scratch on the base model's activations on base data;
- **D** (base model, fine-tune data) and **M** (fine-tuned model, base data), each continued from S;
- **F** (fine-tuned model, fine-tune data), continued from D (`F_via_D`) and from M (`F_via_M`);
- **control**: S continued on base model, base data. Nothing changed, so its rotation is what
  training on for that many steps does anyway: the noise floor.

Every continuation is a warm start (`saelab.train.WarmStart`): S's input scale at every stage (so
weights stay comparable), no data-dependent re-initialisation, no resampling of dead latents (a
latent keeps its identity), a fresh Adam with the same settings and `stage_steps` steps each. The
two F stages see the same batches (the ft/ft stream is rewound), so they differ only in where
they started; the control continues the base/base stream after S.

Per latent and transition a -> b, the cosine between a's and b's encoder columns (what makes it
fire) and decoder rows (what it writes), in raw activation space. A low cosine is a large
rotation. The null is the `null_quantile` quantile (default 1%) of the S -> control cosines over
latents that fired at least `min_fires` times in the control; a latent "rotates beyond the
control" on a transition when its cosine is below that. The transitions that change only the
model (S->M, D->F_via_D) point at what the fine-tune did to the model; those that change only the
data (S->D, M->F_via_M) at what the new data contains.

    result = train_stages(cfg, {"base/base": s1, "base/ft": s2, "ft/base": s3, "ft/ft": s4}, steps=2000)
    result.cosines("S", "M")["decoder"]          # [d_sae]
    result.ranked("D->F_via_D", top=20)           # latents rotating beyond the control
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError

STAGE_DATA = {"S": ("base", "base"), "D": ("base", "ft"), "M": ("ft", "base"), "F": ("ft", "ft")}  # (model, data)
SOURCE_KEYS = tuple(f"{m}/{d}" for m, d in STAGE_DATA.values())  # model/data
STAGES = ("S", "D", "M", "F_via_D", "F_via_M", "control")
STAGE_SOURCE = {
    "S": "base/base",
    "D": "base/ft",
    "M": "ft/base",
    "F_via_D": "ft/ft",
    "F_via_M": "ft/ft",
    "control": "base/base",
}
STAGE_PARENT = {"D": "S", "M": "S", "F_via_D": "D", "F_via_M": "M", "control": "S"}
TRANSITIONS = {name: (STAGE_PARENT[b], b) for name, b in (("S->D", "D"), ("S->M", "M"), ("D->F_via_D", "F_via_D"))}
TRANSITIONS.update({"M->F_via_M": ("M", "F_via_M"), "S->control": ("S", "control")})
MODEL_TRANSITIONS = ("S->M", "D->F_via_D")  # only the model changes
DATA_TRANSITIONS = ("S->D", "M->F_via_M")  # only the data changes
CONTROL = "S->control"
KINDS = ("encoder", "decoder")
NULL_QUANTILE = 0.01
MIN_FIRES = 10


def latent_vectors(sae: Any) -> dict[str, torch.Tensor]:
    """Per latent [d_sae, width]: the encoder column and the decoder row, in raw activation space."""
    return {"encoder": sae.W_enc.detach().float().t().cpu(), "decoder": sae.W_dec.detach().float().cpu()}


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of `a` with the same row of `b` (NaN where either row is zero)."""
    den = a.norm(dim=1) * b.norm(dim=1)
    cos = (a * b).sum(1) / den.clamp_min(1e-30)
    return torch.where(den > 0, cos.clamp(-1, 1), torch.full_like(cos, math.nan))


@dataclass
class StagesResult:
    """The dictionaries of every stage and what reading their rotations needs.

    `saes` by stage (`STAGES`), each taking raw activations; `fire_counts` by stage: how many
    training tokens each latent fired on during that stage (rare latents rotate noisily, so the
    null and the ranking use latents that fired at least `min_fires` times in the later stage);
    `input_scale`: S's scale, used at every stage.
    """

    saes: dict[str, Any]
    fire_counts: dict[str, torch.Tensor]
    input_scale: dict[str, float]
    steps: int
    stage_steps: int
    tokens: dict[str, int] = field(default_factory=dict)
    final_fvu: dict[str, float] = field(default_factory=dict)
    null_quantile: float = NULL_QUANTILE
    min_fires: int = MIN_FIRES
    contexts: dict[str, dict[int, list[dict]]] = field(default_factory=dict)  # transition -> latent -> top contexts

    def cosines(self, a: str, b: str) -> dict[str, torch.Tensor]:
        """{"encoder": [d_sae], "decoder": [d_sae]}: per latent, the cosine between stages a and b."""
        for name in (a, b):
            if name not in self.saes:
                raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(self.saes)}")
        va, vb = latent_vectors(self.saes[a]), latent_vectors(self.saes[b])
        return {k: row_cosines(va[k], vb[k]) for k in KINDS}

    @property
    def transitions(self) -> dict[str, dict[str, torch.Tensor]]:
        """Cosines of every transition (`TRANSITIONS`), by name."""
        return {name: self.cosines(a, b) for name, (a, b) in TRANSITIONS.items()}

    def alive(self, stage: str) -> torch.Tensor:
        """[d_sae] bool: latents that fired at least `min_fires` times while training `stage`."""
        return self.fire_counts[stage] >= self.min_fires

    def null(self, kind: str = "decoder") -> float:
        """The `null_quantile` quantile of S -> control cosines over latents alive in the control:
        a cosine below it is more rotation than continued training on unchanged data gives."""
        _check_kind(kind)
        cos = self.cosines("S", "control")[kind]
        keep = self.alive("control") & torch.isfinite(cos)
        if not keep.any():
            return math.nan
        return float(torch.quantile(cos[keep].double(), self.null_quantile))

    def ranked(self, transition: str, kind: str = "decoder", top: int | None = 20) -> list[dict[str, Any]]:
        """Latents alive in the transition's later stage whose `kind` cosine is below the null,
        most rotated first: latent, both cosines, the control's cosine of that latent, how far
        below the null (`beyond_null` = null - cosine) and the fraction of control latents that
        rotated at least as much (`control_fraction`, an empirical p-value)."""
        _check_kind(kind)
        if transition not in TRANSITIONS:
            raise ConfigError(f"unknown transition {transition!r}; transitions: {', '.join(TRANSITIONS)}")
        a, b = TRANSITIONS[transition]
        cos = self.cosines(a, b)
        control = self.cosines("S", "control")
        ref = control[kind][self.alive("control") & torch.isfinite(control[kind])]
        null = self.null(kind)
        keep = self.alive(b) & torch.isfinite(cos[kind]) & (cos[kind] < null)
        order = sorted(keep.nonzero().flatten().tolist(), key=lambda j: float(cos[kind][j]))
        rows = []
        for j in order[:top] if top is not None else order:
            c = float(cos[kind][j])
            rows.append(
                {
                    "latent": j,
                    "encoder": float(cos["encoder"][j]),
                    "decoder": float(cos["decoder"][j]),
                    "control": float(control[kind][j]),
                    "null": null,
                    "beyond_null": null - c,
                    "control_fraction": (1 + int((ref <= c).sum())) / (1 + ref.numel()),
                    "fires": int(self.fire_counts[b][j]),
                }
            )
        return rows

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per transition and kind: alive latents, the median cosine and how many lie beyond the null."""
        out = {}
        for name, (_, b) in TRANSITIONS.items():
            cos = self.cosines(*TRANSITIONS[name])
            alive = self.alive(b)
            row = {"alive": int(alive.sum())}
            for kind in KINDS:
                c = cos[kind][alive & torch.isfinite(cos[kind])]
                row[f"{kind}_median"] = float(c.median()) if c.numel() else math.nan
                row[f"{kind}_beyond_null"] = int((c < self.null(kind)).sum())
            out[name] = row
        return out

    def as_dict(self, top: int = 20) -> dict[str, Any]:
        """Everything as strict JSON (NaN and infinities become null)."""
        from saelab.diffing.report import _finite_or_null

        return _finite_or_null(
            {
                "stages": list(self.saes),
                "stage_data": {s: STAGE_SOURCE[s] for s in self.saes},
                "steps": self.steps,
                "stage_steps": self.stage_steps,
                "input_scale": self.input_scale,
                "tokens": self.tokens,
                "final_fvu": self.final_fvu,
                "null": {"quantile": self.null_quantile, "min_fires": self.min_fires}
                | {kind: self.null(kind) for kind in KINDS},
                "summary": self.summary(),
                "transitions": {
                    name: {kind: c[kind].tolist() for kind in KINDS} for name, c in self.transitions.items()
                },
                "fire_counts": {s: c.tolist() for s, c in self.fire_counts.items()},
                "ranked": {
                    name: {kind: self.ranked(name, kind, top) for kind in KINDS}
                    for name in (*MODEL_TRANSITIONS, *DATA_TRANSITIONS)
                },
                "contexts": {t: {str(j): v for j, v in by.items()} for t, by in self.contexts.items()},
            }
        )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be 'encoder' or 'decoder', not {kind!r}")


# ---------------------------------------------------------------------------- training
def train_stages(
    sae_or_cfg: Any,
    sources: Mapping[str, Any],
    *,
    steps: int,
    stage_steps: int | None = None,
    train: dict | Any | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    null_quantile: float = NULL_QUANTILE,
    min_fires: int = MIN_FIRES,
) -> StagesResult:
    """Train S for `steps` on sources["base/base"], then D, M, F_via_D, F_via_M and the control for
    `stage_steps` (default `steps`) each, as warm starts (see the module docstring).

    `sources` maps "base/base", "base/ft", "ft/base", "ft/ft" (model/data) to anything `train`
    takes: an ActivationSource, a source spec (a `source:` mapping), or an iterable of batches.
    `train`: the training config of every stage (its `steps` and `seed` are set here). With
    `out_dir`, each stage trains (and resumes) in out_dir/<stage>/ and its SAE is saved in
    out_dir/<stage>/sae. Every input is checked before anything trains.
    """
    from saelab.sae.base import SAE
    from saelab.sae.registry import create
    from saelab.train.trainer import SiteView, TrainConfig, WarmStart
    from saelab.train.trainer import train as train_one

    steps, stage_steps = (
        _positive("steps", steps),
        _positive("stage_steps", steps if stage_steps is None else stage_steps),
    )
    if not 0 < null_quantile < 0.5:
        raise ConfigError(f"null_quantile must be in (0, 0.5) (got {null_quantile}); e.g. 0.01 for the 1st percentile")
    if isinstance(min_fires, bool) or not isinstance(min_fires, int) or min_fires < 0:
        raise ConfigError(f"min_fires must be a non-negative integer (got {min_fires!r})")
    base_cfg = _train_config(train, TrainConfig)
    if isinstance(sae_or_cfg, SAE):
        sae = copy.deepcopy(sae_or_cfg)
    elif isinstance(sae_or_cfg, Mapping):
        try:
            sae = create(dict(sae_or_cfg))
        except ConfigError as exc:
            raise ConfigError(f"sae: {exc}") from None
    else:
        raise ConfigError(f"sae must be an SAE or a config mapping, got {type(sae_or_cfg).__name__}")
    if sae.fitted:
        raise ConfigError(
            f"sae: '{sae.architecture}' is fitted in closed form; stage-wise diffing fine-tunes by gradient"
        )
    built = _build_sources(sources, SiteView.of(sae.cfg), base_cfg.device)
    out = Path(out_dir) if out_dir is not None else None

    def stage_cfg(n: int):
        return base_cfg.model_copy(update={"steps": n, "seed": seed})

    def folder(stage: str) -> Path | None:
        return None if out is None else out / stage

    results = {"S": train_one(sae, built["base/base"], stage_cfg(steps), folder("S"))}
    warm = WarmStart(dict(results["S"].site_scales) or results["S"].input_scale)
    ft_start = built["ft/ft"].state_dict()
    for stage in ("control", "D", "M", "F_via_D", "F_via_M"):
        source = built[STAGE_SOURCE[stage]]
        if stage == "F_via_M":
            source.load_state_dict(ft_start)  # both F stages see the same batches
        elif stage == "F_via_D":
            ft_start = source.state_dict()
        parent = copy.deepcopy(results[STAGE_PARENT[stage]].sae)
        results[stage] = train_one(parent, source, stage_cfg(stage_steps), folder(stage), warm_start=warm)
    if out is not None:
        from saelab.io.formats import save

        for stage, r in results.items():
            save(r.sae, out / stage / "sae", sparsity=r.latent_stats.fire_count.float() / max(r.tokens, 1))
    return StagesResult(
        saes={s: results[s].sae for s in STAGES},
        fire_counts={s: results[s].latent_stats.fire_count.detach().cpu().clone() for s in STAGES},
        input_scale=dict(results["S"].site_scales),
        steps=steps,
        stage_steps=stage_steps,
        tokens={s: results[s].tokens for s in STAGES},
        final_fvu={s: results[s].history[-1]["fvu"] if results[s].history else math.nan for s in STAGES},
        null_quantile=null_quantile,
        min_fires=min_fires,
    )


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer (got {value!r})")
    return value


def _train_config(train: Any, TrainConfig: type) -> Any:
    """The stages' shared training config; `steps` and `seed` belong to `train_stages` itself."""
    if isinstance(train, TrainConfig):
        return train
    if train is not None and not isinstance(train, Mapping):
        raise ConfigError(f"train must be a mapping of training settings, got {type(train).__name__}")
    values = dict(train or {})
    for key, instead in (("steps", "`steps` (S) and `stage_steps` (every later stage)"), ("seed", "`seed`")):
        if key in values:
            raise ConfigError(f"train.{key}: stage-wise training sets it from {instead}; remove it from `train`")
    try:
        return TrainConfig.parse(values)
    except ConfigError as exc:
        raise ConfigError(f"train: {exc}") from None


def _build_sources(sources: Mapping[str, Any], view: Any, device: str) -> dict[str, Any]:
    """Each source built and checked (keys, width, at least one non-empty batch), before any training."""
    from saelab.activations.base import ActivationSource, as_source
    from saelab.activations.factory import parse_source
    from saelab.train.trainer import check_view_against_source, next_checked_batch

    if not isinstance(sources, Mapping):
        raise ConfigError(f"sources must be a mapping with keys {', '.join(SOURCE_KEYS)} (model/data)")
    missing = [k for k in SOURCE_KEYS if k not in sources]
    unknown = [k for k in sources if k not in SOURCE_KEYS]
    if missing or unknown:
        what = f"missing {missing}" if missing else f"unknown {unknown}"
        raise ConfigError(f"sources: {what}; give exactly {', '.join(SOURCE_KEYS)} (model/data)")
    built = {}
    for key in SOURCE_KEYS:
        where = f"sources[{key!r}]"
        entry = sources[key]
        try:
            if isinstance(entry, Mapping):
                source = parse_source(dict(entry), where).build()
            elif isinstance(entry, ActivationSource):
                source = entry
            elif isinstance(entry, Iterable) or callable(entry):
                source = as_source(entry, view.d_in)
            else:
                raise ConfigError(
                    f"must be a source spec, an ActivationSource or an iterable of batches, not {type(entry).__name__}"
                )
            check_view_against_source(view, source)
            start = source.state_dict()
            next_checked_batch(source, view, device, "its first batch")
            source.load_state_dict(start)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
        if any(source is other for other in built.values()):
            raise ConfigError(f"{where} is the same source object as another entry; give each its own source")
        built[key] = source
    return built


# ---------------------------------------------------------------------------- top contexts
def top_contexts(
    sae: Any, source: Any, latents: list[int], *, top: int = 10, rows: int = 256, batches: int = 8, window: int = 16
) -> dict[int, list[dict[str, Any]]]:
    """Where each latent of `latents` fires most under `sae`.

    For a one-model `type: model` source spec: the top token windows (text, tokens, values, peak
    position) from `rows` token rows of its text (`saelab.reading.contexts`). For any other
    source: the indices of the top-activating rows over `batches` batches, with their values (a
    spec is built afresh, so rows count from its start; a source object is read from where it is).
    """
    if not latents:
        return {}
    if isinstance(source, Mapping) and source.get("type") == "model" and source.get("model"):
        return _token_contexts(sae, dict(source), latents, top, rows, window)
    return _row_contexts(sae, source, latents, top, batches)


def _token_contexts(sae, spec: dict, latents: list[int], top: int, rows: int, window: int) -> dict:
    from saelab.activations.factory import parse_source
    from saelab.models.source import load_model
    from saelab.models.text import eval_batches
    from saelab.reading.contexts import collect_contexts

    parsed = parse_source(spec).model_dump(exclude_none=True)
    if not isinstance(parsed.get("hookpoint"), str):
        raise ConfigError("top contexts need a source with one `hookpoint` (a module path)")
    model, tokenizer = load_model(
        parsed["model"], gguf_file=parsed.get("gguf_file"), dtype=parsed["dtype"], device=parsed["device"]
    )
    batches = list(eval_batches(tokenizer, parsed, rows))
    collection = collect_contexts(
        sae,
        model,
        batches,
        hookpoint=parsed["hookpoint"],
        tokenizer=tokenizer,
        latents=list(latents),
        top_k=top,
        n_bins=1,
        per_bin=1,
        window=window,
        n_random=0,
        progress=False,
    )
    out = {}
    for j in latents:
        contexts = collection.latents[j].top if j in collection.latents else []
        out[j] = [
            {
                "text": tokenizer.decode(c.token_ids),
                "peak_token": tokenizer.decode([c.token_ids[c.peak]]),
                "value": max(c.values),
                "doc": c.doc,
                "position": c.position,
                "tokens": c.token_ids,
                "values": c.values,
            }
            for c in contexts
        ]
    return out


def _row_contexts(sae, source: Any, latents: list[int], top: int, batches: int) -> dict:
    from saelab.activations.base import as_source
    from saelab.activations.factory import parse_source

    stream = parse_source(dict(source)).build() if isinstance(source, Mapping) else as_source(source, sae.cfg.d_in)
    idx = torch.tensor(latents)
    values, offset = [], 0
    for _ in range(batches):
        try:
            batch = next(stream)
        except StopIteration:
            break
        with torch.no_grad():
            values.append(sae.encode(batch.x.float().to(sae.W_dec.device))[:, idx].cpu())
        offset += batch.x.shape[0]
    if not values:
        return {j: [] for j in latents}
    acts = torch.cat(values)
    k = min(top, acts.shape[0])
    best, rows = acts.topk(k, dim=0)
    return {
        j: [{"row": int(r), "value": float(v)} for r, v in zip(rows[:, i], best[:, i], strict=True) if v > 0]
        for i, j in enumerate(latents)
    }


def add_contexts(
    result: StagesResult, sources: Mapping[str, Any], *, kind: str = "decoder", top: int = 20, contexts: int = 5
) -> None:
    """The `contexts` top contexts of the `top` ranked latents of every model and data transition,
    in the F stage its path reaches, on that stage's data (sources["ft/ft"]); into `result.contexts`."""
    for name in (*MODEL_TRANSITIONS, *DATA_TRANSITIONS):
        latents = [r["latent"] for r in result.ranked(name, kind, top)]
        result.contexts[name] = top_contexts(result.saes[final_stage(name)], sources["ft/ft"], latents, top=contexts)


def final_stage(transition: str) -> str:
    """The F stage a transition's path leads to (the control's: F_via_D)."""
    return "F_via_M" if transition in ("S->M", "M->F_via_M") else "F_via_D"


# ---------------------------------------------------------------------------- configs
def model_sources(
    models: Mapping[str, str], data: Mapping[str, Any], hookpoint: str, **common: Any
) -> dict[str, dict[str, Any]]:
    """The four `type: model` source specs of a base / fine-tuned pair: {"base/ft": {model:
    models["base"], data: data["ft"], hookpoint, ...}, ...}; `common` adds settings to each
    (batch_size, context_size, repeat, ...)."""
    for name, value in (("models", models), ("data", data)):
        if not isinstance(value, Mapping) or sorted(value) != ["base", "ft"]:
            got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise ConfigError(f"{name} must map exactly `base` and `ft` (got {got})")
    if not isinstance(hookpoint, str) or not hookpoint:
        raise ConfigError("hookpoint: give the module path both models are read at, e.g. model.layers.1")
    for alias, text in data.items():
        texts = text.get("texts") if isinstance(text, Mapping) else text
        if isinstance(texts, (list, tuple)) and not texts:
            raise ConfigError(f"data.{alias}: the text list is empty; give at least one document")
    for key in ("type", "model", "models", "data", "hookpoint", "hookpoints"):
        if key in common:
            raise ConfigError(f"source.{key}: set by the stage-wise shorthand (models, data, hookpoint); remove it")
    return {
        f"{m}/{d}": {"type": "model", "model": models[m], "data": data[d], "hookpoint": hookpoint, **common}
        for m, d in STAGE_DATA.values()
    }


def _stages_config_model():
    from pydantic import Field, NonNegativeInt, PositiveInt

    from saelab.config import StrictModel

    class StagesConfig(StrictModel):
        """`saelab diff stages CONFIG`: one dictionary fine-tuned through S, D, M, F and a control."""

        sae: dict[str, Any] = Field(description="The dictionary config (architecture, d_in, d_sae, ...).")
        train: dict[str, Any] = Field(default_factory=dict, description="Training settings of every stage.")
        steps: PositiveInt = Field(description="Steps of S (from scratch on base model, base data).")
        stage_steps: PositiveInt | None = Field(None, description="Steps of every later stage (default: steps).")
        seed: int = Field(0, description="Training seed of every stage.")
        null_quantile: float = Field(
            NULL_QUANTILE, gt=0, lt=0.5, description="Quantile of control cosines used as the null."
        )
        min_fires: NonNegativeInt = Field(MIN_FIRES, description="Firings in the later stage for a latent to count.")
        top: PositiveInt = Field(20, description="Ranked latents reported per transition.")
        contexts: NonNegativeInt = Field(5, description="Top contexts per ranked latent (0: none).")
        sources: dict[str, Any] | None = Field(None, description="{base/base, base/ft, ft/base, ft/ft: source spec}.")
        models: dict[str, str] | None = Field(None, description="Shorthand: {base: PATH, ft: PATH}.")
        data: dict[str, Any] | None = Field(None, description="Shorthand: {base: TEXT_SPEC, ft: TEXT_SPEC}.")
        hookpoint: str | None = Field(None, description="Shorthand: the module path read in both models.")
        source: dict[str, Any] = Field(
            default_factory=dict, description="Shorthand: settings added to each model source."
        )

        def stage_sources(self) -> dict[str, Any]:
            shorthand = {"models": self.models, "data": self.data, "hookpoint": self.hookpoint}
            given = [k for k, v in shorthand.items() if v is not None]
            if self.sources is not None:
                if given or self.source:
                    extra = given + (["source"] if self.source else [])
                    raise ConfigError(f"give `sources` or the shorthand (models, data, hookpoint), not both ({extra})")
                return self.sources
            missing = [k for k, v in shorthand.items() if v is None]
            if missing:
                raise ConfigError(
                    f"give `sources` (the four model/data source specs) or all of models, data and hookpoint "
                    f"(missing {missing})"
                )
            return model_sources(self.models, self.data, self.hookpoint, **self.source)

    return StagesConfig


def parse_stages_config(values: Any) -> Any:
    """A validated `saelab diff stages` config (unknown keys and bad values named)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"a stages config must be a mapping, got {type(values).__name__}")
    return _stages_config_model().parse(dict(values))


def run_stages(config: Mapping[str, Any], out: str | Path, title: str = "Stage-wise model diff") -> StagesResult:
    """Train every stage of `config` in out/stages/, read the ranked latents' top contexts and
    write results.json, report.md, report.html and the plots into `out`."""
    from saelab.diffing.stages_report import write_stages_report

    cfg = parse_stages_config(config)
    sources = cfg.stage_sources()
    result = train_stages(
        cfg.sae, sources, steps=cfg.steps, stage_steps=cfg.stage_steps, train=cfg.train, seed=cfg.seed,
        out_dir=Path(out) / "stages", null_quantile=cfg.null_quantile, min_fires=cfg.min_fires,
    )  # fmt: skip
    if cfg.contexts:
        add_contexts(result, sources, top=cfg.top, contexts=cfg.contexts)
    write_stages_report(result, out, title, top=cfg.top)
    return result
