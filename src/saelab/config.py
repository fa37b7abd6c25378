"""Strict config models: unknown keys are rejected and every error names its field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from saelab.errors import ConfigError


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            valid = ", ".join(sorted(model.model_fields))
            lines.append(f"unknown key '{where}' for {model.__name__}; valid keys: {valid}")
        else:
            lines.append(f"'{where}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


class StrictModel(BaseModel):
    """Base of every saelab config: no unknown keys, and `parse` raises ConfigError."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, values: dict[str, Any]):
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, cls)) from None
