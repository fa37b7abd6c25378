"""Build an activation source from a plain config dict (YAML/JSON `source:` section)."""

from __future__ import annotations

from typing import Any, Callable

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
    from saelab.toys.features import ToySource, ToyWorld

    allowed = {"world", "batch_size", "seed"}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in toy source; valid keys: {sorted(allowed)}")
    return ToySource(ToyWorld(spec.get("world") or {}), int(spec.get("batch_size", 1024)), int(spec.get("seed", 0)))
