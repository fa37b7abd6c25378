"""Architecture name -> SAE class. Adding a variant means one `@register` in its own module."""

from __future__ import annotations

from typing import Any

from saelab.errors import ConfigError
from saelab.sae.base import SAE, SAEConfig

_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` available under `cls.architecture`."""
    name = cls.architecture
    if not name:
        raise TypeError(f"{cls.__name__} must set a non-empty `architecture`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"architecture '{name}' is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def list_architectures() -> list[str]:
    return sorted(_REGISTRY)


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
