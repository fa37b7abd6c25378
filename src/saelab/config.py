"""Strict config models: unknown keys are rejected and every error names its field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from saelab.errors import ConfigError


def describe_validation_error(exc: ValidationError, model: type[BaseModel], drop: tuple[str, ...] = ()) -> str:
    """One line per problem, each naming its field; `drop`: a leading location to leave out (a union's tag)."""
    lines = []
    for err in exc.errors():
        loc = err["loc"][1:] if err["loc"] and str(err["loc"][0]) in drop else err["loc"]
        where = ".".join(str(p) for p in loc) or "config"
        where = f"'{where}'" if where.isprintable() else repr(where)  # a key with a newline stays on one line
        msg = " ".join(str(err["msg"]).split())
        if err["type"] == "extra_forbidden":
            valid = ", ".join(sorted(model.model_fields))
            lines.append(f"unknown key {where} for {model.__name__}; valid keys: {valid}")
        else:
            lines.append(f"{where}: {msg} (got {err.get('input')!r})")
    return "; ".join(lines)


class StrictModel(BaseModel):
    """Base of every saelab config: no unknown keys, no silent coercion (`1.9`, `true` or `"32"`
    for a count, `"x"` for a seed are errors), and `parse` raises ConfigError."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @classmethod
    def parse(cls, values: dict[str, Any]):
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, cls)) from None
