"""Typed source configs (the YAML/JSON `source:` section) and the sources they build.

`SourceConfig` is a union discriminated on `type`; each member validates every value with the
same one-line error format as the SAE config (`batch_size: abc`, `seed: x`, `batch_size: 1.9`
or a list where a mapping belongs are errors naming the field) and builds its source with
`build()`. Defaults live here, once. `held_out` is the one rule for evaluation data.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, TypeAdapter, ValidationError, ValidationInfo, field_validator

from saelab.config import StrictModel, describe_validation_error
from saelab.errors import ConfigError

DEFAULT_BATCH_SIZE = 1024


class _Source(StrictModel):
    batch_size: PositiveInt = Field(DEFAULT_BATCH_SIZE, description="Activation rows per batch.")
    seed: int = Field(0, description="Seed of the sampling stream (shuffling, toy-world draws).")

    def build(self):
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The plain dict this config came from, with every default filled in (for metadata)."""
        return self.model_dump(mode="json", exclude_none=True)


class WorldSource(_Source):
    """A ground-truth world (saelab.toys.worlds): `world: {kind: independent | correlated | hierarchy | bundle, ...}`.
    `type: toy` is the same source (the independent world's original name)."""

    type: Literal["world", "toy"] = "world"
    world: dict[str, Any] = Field(default_factory=dict, description="The world spec (its `kind` and settings).")

    def build(self):
        from saelab.toys.features import ToySource
        from saelab.toys.worlds import World

        return ToySource(World(self.world), self.batch_size, self.seed)


class TokenWorldSource(WorldSource):
    """An independent world plus a per-token mean (for the Tokenized SAE): batches carry token ids."""

    type: Literal["toy_tokens"] = "toy_tokens"  # type: ignore[assignment]
    vocab_size: PositiveInt = Field(64, description="Number of token ids.")
    mean_norm: float = Field(1.0, ge=0, description="Norm of each token's mean vector.")
    zipf_exponent: float = Field(1.0, ge=0, description="Token frequencies ~ 1/rank^exponent.")
    token_seed: int = Field(0, description="Seed of the per-token means.")

    def build(self):
        from saelab.activations.tokens import TokenMeanSource

        base = super().build()
        return TokenMeanSource(base, self.vocab_size, self.mean_norm, self.zipf_exponent, self.seed, self.token_seed)


class TranscoderWorldSource(_Source):
    """A transcoder's ground-truth world (saelab.toys.circuits): sparse input features through a known
    sparse map to output features; batches read site `mlp_in` and write `mlp_out`."""

    type: Literal["transcoder_world"] = "transcoder_world"
    world: dict[str, Any] = Field(default_factory=dict, description="TranscoderSpec settings (n_in, d_in, ...).")

    def build(self):
        from saelab.toys.circuits import TranscoderWorld
        from saelab.toys.features import ToySource

        return ToySource(TranscoderWorld(self.world), self.batch_size, self.seed)


class CrosscoderWorldSource(_Source):
    """A crosscoder's ground-truth world (saelab.toys.circuits): features shared by sites `a` and `b`,
    only in one, or rescaled between them; `x` is [x_a | x_b]."""

    type: Literal["crosscoder_world"] = "crosscoder_world"
    world: dict[str, Any] = Field(default_factory=dict, description="CrosscoderSpec settings (d, n_shared, ...).")

    def build(self):
        from saelab.toys.circuits import CrosscoderWorld
        from saelab.toys.features import ToySource

        return ToySource(CrosscoderWorld(self.world), self.batch_size, self.seed)


class TMSSource(_Source):
    """The hidden layer of a toy model of superposition, trained when the source is built."""

    type: Literal["tms"] = "tms"
    tms: dict[str, Any] = Field(default_factory=dict, description="TMSWorld settings (saelab.toys.tms).")

    def build(self):
        from saelab.toys.features import ToySource
        from saelab.toys.tms import TMSWorld

        return ToySource(TMSWorld(self.tms), self.batch_size, self.seed)


class DiffWorldSource(_Source):
    """Two "models" over known features (saelab.diffing.world): sites `base` and `ft`, for crosscoder diffing."""

    type: Literal["diff_world"] = "diff_world"
    world: dict[str, Any] = Field(default_factory=dict, description="DiffWorld settings (d, n_shared, ...).")
    stage: Literal["base/base", "base/ft", "ft/base", "ft/ft"] | None = Field(
        None,
        description="model/data: one model's site on one data distribution, for stage-wise diffing (base data "
        "never fires the fine-tune-only features); None: both sites.",
    )

    def build(self):
        from saelab.diffing.world import DiffWorld, StageWorld
        from saelab.toys.features import ToySource

        world = DiffWorld(self.world)
        if self.stage is not None:
            world = StageWorld(world, *self.stage.split("/"))
        return ToySource(world, self.batch_size, self.seed)


_ONE_OR_SEVERAL = "give `hookpoint` (one site) or `hookpoints` (several), not both"


def _check_hookpoints(value: Any, info: ValidationInfo, required: bool) -> Any:
    """`hookpoints` beside `hookpoint`: exactly one of them (`required`) or at most one, never an empty list."""
    one = info.data.get("hookpoint") is not None
    if value is not None and one:
        raise ValueError(_ONE_OR_SEVERAL)
    if value is None and not one and required:
        raise ValueError("a model source needs `hookpoint` (one site, e.g. model.layers.15) or `hookpoints` (several)")
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(
            "the list is empty; name at least one site, e.g. [model.layers.3.mlp:input, model.layers.3.mlp]"
        )
    return value


class ModelEntry(StrictModel):
    """One model of a several-model source; what it leaves unset comes from the source's own keys."""

    model: str = Field(description="A local model folder, a model in the local HF cache, or 'smollm2'.")
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str | None = None
    task: str | None = None


class ModelSource(_Source):
    """Activations of a Hugging Face model on text (saelab.models); `cache_dir` reads via a disk cache.

    Several sites per batch: `hookpoints` (read in one forward), and `models` to run the same
    tokens through several models sharing one vocabulary; batches then carry `sites` keyed
    `hookpoint` (one model) or `alias/hookpoint` (several: `base/model.layers.2`)."""

    type: Literal["model"] = "model"
    model: str | None = Field(
        None, description="A local model folder, a model in the local HF cache, or 'smollm2' (or `models`)."
    )
    models: dict[str, ModelEntry] | None = Field(
        None,
        validate_default=True,
        description="Several models on the same tokens: {alias: model or {model, gguf_file, dtype, device, task}}, "
        "or a list (aliases `base`, `ft`, or each entry's `alias`). Sites are keyed alias/hookpoint.",
    )
    hookpoint: str | list[str] | None = Field(None, description="The module path (or glob) whose output is read.")
    hookpoints: list[str] | None = Field(
        None,
        validate_default=True,
        description="Several module paths (globs allowed) read in one forward; every batch carries them all as sites.",
    )
    target_hookpoint: str | None = Field(None, description="A second module read as the target (transcoders).")
    data: str | dict[str, Any] = Field("pydoc", description="Text: 'pydoc', a file, or {path, column}.")
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    task: str = "causal-lm"
    buffer_tokens: PositiveInt = Field(65_536, description="Shuffling-buffer size in tokens.")
    repeat: bool = Field(False, description="Start the text again when it ends.")
    cache_dir: str | None = Field(None, description="Harvest once into this folder, then read from it.")
    cache_tokens: PositiveInt | None = Field(None, description="Cap on harvested tokens (default: all).")
    shard_tokens: PositiveInt = Field(262_144, description="Tokens per cache shard.")
    column: str | None = None
    context_size: PositiveInt | None = None
    model_batch_size: PositiveInt | None = None
    packing: bool | None = None
    prepend_bos: bool | None = None
    exclude_special: bool | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _name_models(cls, value: Any, info: ValidationInfo) -> Any:
        from saelab.models.source import model_entry, name_models

        if (value is None) == (info.data.get("model") is None):
            raise ValueError(
                "give `model` (one model, e.g. model: smollm2) or `models` (several, e.g. {base: M1, ft: M2}), "
                "exactly one of them"
            )
        if value is None:
            return None
        return {alias: model_entry(alias, entry) for alias, entry in name_models(value).items()}

    @field_validator("hookpoints", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_hookpoints(value, info, required=True)

    @field_validator("target_hookpoint")
    @classmethod
    def _one_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("models") is not None:
            raise ValueError(
                "target_hookpoint reads one model; with `models`, list every site in `hookpoints` and name the "
                "one a dictionary writes in its config (e.g. 'ft/model.layers.2')"
            )
        return value

    def build(self):
        from saelab.models.source import source_from_spec

        return source_from_spec(self.model_dump(exclude={"type"}, exclude_none=True))


class CacheSource(_Source):
    """Activations harvested earlier by `saelab harvest` (saelab.activations.cache)."""

    type: Literal["cache"] = "cache"
    path: str = Field(description="The folder `saelab harvest` wrote.")
    hookpoint: str | None = Field(None, description="The site read (default: the cache's only one).")
    hookpoints: list[str] | None = Field(
        None, description="Several sites read together (globs allowed; `alias/hookpoint` for one model's)."
    )
    target_hookpoint: str | None = None
    model: str | None = Field(None, description="Refuse a cache harvested from another model.")
    models: dict[str, str] | None = Field(None, description="Refuse a cache not harvested from these {alias: model}.")
    shuffle: bool | None = None
    repeat: bool | None = None
    verify: bool | None = None

    @field_validator("hookpoints", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_hookpoints(value, info, required=False)

    def build(self):
        from saelab.activations.cache import CachedSource

        values = self.model_dump(exclude={"type", "path", "hookpoint", "batch_size"}, exclude_none=True)
        return CachedSource(self.path, self.hookpoint, self.batch_size, **values)


class TensorFileSource(_Source):
    """Plain activations from a safetensors file: one [N, d] tensor, in batches (shuffled by `seed`)."""

    type: Literal["tensors"] = "tensors"
    path: str = Field(description="A .safetensors file.")
    key: str | None = Field(None, description="The tensor's name in the file (default: its only tensor).")
    shuffle: bool = Field(True, description="Shuffle rows (once per pass) with `seed`.")
    repeat: bool = Field(True, description="Start again when the rows run out.")

    def build(self):
        from saelab.activations.base import TensorSource

        return TensorSource.from_file(self.path, self.key, self.batch_size, self.seed, self.shuffle, self.repeat)


SourceConfig = Annotated[
    WorldSource
    | TokenWorldSource
    | TranscoderWorldSource
    | CrosscoderWorldSource
    | DiffWorldSource
    | TMSSource
    | ModelSource
    | CacheSource
    | TensorFileSource,
    Field(discriminator="type"),
]
_ADAPTER = TypeAdapter(SourceConfig)
_BY_TYPE = {
    "world": WorldSource,
    "toy": WorldSource,
    "toy_tokens": TokenWorldSource,
    "transcoder_world": TranscoderWorldSource,
    "crosscoder_world": CrosscoderWorldSource,
    "tms": TMSSource,
    "diff_world": DiffWorldSource,
    "model": ModelSource,
    "cache": CacheSource,
    "tensors": TensorFileSource,
}


def parse_source(values: Any, where: str = "source") -> _Source:
    """Validate a `source:` mapping; every error names the field (`source.batch_size: ...`)."""
    if isinstance(values, _Source):
        return values
    if values is None:
        values = {"type": "world"}
    if not isinstance(values, dict):
        raise ConfigError(
            f"`{where}` must be a mapping with a `type` ({', '.join(sorted(_BY_TYPE))}), got {type(values).__name__}"
        )
    kind = values.get("type", "world")
    if not isinstance(kind, str) or kind not in _BY_TYPE:
        raise ConfigError(f"unknown {where} type {kind!r}; valid types: {', '.join(sorted(_BY_TYPE))}")
    try:
        return _ADAPTER.validate_python({**values, "type": kind})
    except ValidationError as exc:
        model = _BY_TYPE[kind]
        message = describe_validation_error(exc, model, drop=(kind,))
        raise ConfigError(f"{where} ({kind}): {message}") from None


def build_source(values: Any):
    """The activation source a `source:` mapping (or a parsed SourceConfig) describes."""
    return parse_source(values).build()


HELD_OUT_SEED_OFFSET = 7919  # a prime, so held-out streams never coincide with a small training seed


def held_out(source: Any, eval_source: Any = None) -> _Source:
    """The evaluation source of a run: `eval_source` when given, else the training source with its
    seed moved by HELD_OUT_SEED_OFFSET. For a toy world that is fresh samples of the same world;
    for a fixed text corpus it only reshuffles the same text (give an `eval_source` with other
    text to measure generalisation on real models)."""
    if eval_source is not None:
        return parse_source(eval_source, "eval_source")
    train = parse_source(source)
    return train.model_copy(update={"seed": train.seed + HELD_OUT_SEED_OFFSET})
