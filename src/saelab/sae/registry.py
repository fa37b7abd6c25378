"""Architecture name -> SAE class. Adding a variant means one `@register` in its own module."""

from __future__ import annotations

from typing import Any, get_args

from saelab.errors import ConfigError
from saelab.sae.base import SAE, SAEConfig, SweepKind

_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` available under `cls.architecture`."""
    name = cls.architecture
    if not name:
        raise TypeError(f"{cls.__name__} must set a non-empty `architecture`")
    _check_sweep(cls)
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"architecture '{name}' is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def _check_sweep(cls: type[SAE]) -> None:
    """A sweep parameter is a config field and says how it varies, so `sweep_setting` never guesses."""
    knob, kind = cls.sweep_parameter, cls.sweep_kind
    if knob is None:
        if kind is not None:
            raise TypeError(f"{cls.__name__} sets sweep_kind={kind!r} but no sweep_parameter")
        return
    if knob not in cls.Config.model_fields:
        raise TypeError(f"{cls.__name__}.sweep_parameter={knob!r} is not a field of {cls.Config.__name__}")
    if kind not in get_args(SweepKind):
        raise TypeError(f"{cls.__name__} must set sweep_kind to one of {get_args(SweepKind)} next to sweep_parameter")
    default = cls.Config.model_fields[knob].default
    if kind == "coefficient" and (isinstance(default, bool) or not isinstance(default, (int, float))):
        raise TypeError(f"{cls.__name__}.{knob} is a coefficient, so its config field needs a numeric default")


def sweep_setting(architecture: str, multiplier: float, true_l0: float) -> dict[str, Any]:
    """The config values of one point of a sparsity sweep, `{}` for an architecture without one.

    Multiplier > 1 always means more active latents: a count is `multiplier x true L0` (at least 1),
    a coefficient is its default divided by the multiplier; multiplier 1 is the default setting.
    """
    if multiplier <= 0:
        raise ConfigError(f"a sweep multiplier must be positive (got {multiplier})")
    cls = get_class(architecture)
    knob = cls.sweep_parameter
    if knob is None:
        return {}
    if cls.sweep_kind == "count":
        return {knob: max(1, round(true_l0 * multiplier))}
    return {knob: float(cls.Config.model_fields[knob].default) / multiplier}


def list_architectures(one_stream: bool = False) -> list[str]:
    """Every registered architecture; with `one_stream`, only those that can train on a single
    activation stream (all but those that need named sites of several layers, `SAE.needs_sites`)."""
    return sorted(name for name, cls in _REGISTRY.items() if not (one_stream and cls.needs_sites))


def capable_architectures(kind: str) -> list[str]:
    """The architectures that can be a `transcoder` or a `crosscoder` (see `SAE.transcodes`)."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.can(kind))


def get_class(name: str) -> type[SAE]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture '{name}'; valid architectures: {', '.join(list_architectures())}"
        ) from None


def make_config(values: dict[str, Any] | SAEConfig) -> SAEConfig:
    """Validate a config dict against its architecture's own Config class."""
    if isinstance(values, SAEConfig):
        return values
    if "architecture" not in values:
        raise ConfigError(
            f"SAE config needs an 'architecture' key; valid architectures: {', '.join(list_architectures())}"
        )
    return get_class(values["architecture"]).Config.parse(dict(values))


def create(values: dict[str, Any] | SAEConfig) -> SAE:
    """Build a freshly initialised SAE from a config dict (or a validated config)."""
    cfg = make_config(values)
    return get_class(cfg.architecture)(cfg)
