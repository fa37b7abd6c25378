"""Build an activation source from a plain config dict (YAML/JSON `source:` section)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from saelab.errors import ConfigError

_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {}


def register_source(name: str):
    def wrap(fn):
        _BUILDERS[name] = fn
        return fn

    return wrap


def build_source(spec: dict[str, Any]):
    spec = dict(spec or {"type": "toy"})
    kind = spec.pop("type", "toy")
    if kind not in _BUILDERS:
        raise ConfigError(f"unknown source type '{kind}'; valid types: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[kind](spec)


@register_source("toy")
def _toy(spec: dict[str, Any]):
    from saelab.toys.features import ToySource
    from saelab.toys.worlds import World

    allowed = {"world", "batch_size", "seed"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in toy source; valid keys: {sorted(allowed)}")
    return ToySource(World(spec.get("world") or {}), int(spec.get("batch_size", 1024)), int(spec.get("seed", 0)))


@register_source("world")
def _world(spec: dict[str, Any]):
    """A composable ground-truth world (saelab.toys.worlds): `world: {kind: hierarchy, ...}`."""
    from saelab.toys.features import ToySource
    from saelab.toys.worlds import World

    allowed = {"world", "batch_size", "seed"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in world source; valid keys: {sorted(allowed)}")
    return ToySource(World(spec.get("world") or {}), int(spec.get("batch_size", 1024)), int(spec.get("seed", 0)))


@register_source("tms")
def _tms(spec: dict[str, Any]):
    """The hidden layer of a toy model of superposition, trained when the source is built."""
    from saelab.toys.features import ToySource
    from saelab.toys.tms import TMSWorld

    allowed = {"tms", "batch_size", "seed"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in tms source; valid keys: {sorted(allowed)}")
    return ToySource(TMSWorld(spec.get("tms") or {}), int(spec.get("batch_size", 1024)), int(spec.get("seed", 0)))


@register_source("model")
def _model(spec: dict[str, Any]):
    """Activations of a Hugging Face model on text (saelab.models); `cache_dir` reads via a disk cache."""
    from saelab.models.source import source_from_spec

    return source_from_spec(spec)


@register_source("cache")
def _cache(spec: dict[str, Any]):
    """Activations harvested earlier by `saelab harvest` (saelab.activations.cache)."""
    from saelab.activations.cache import cache_from_spec

    return cache_from_spec(spec)
