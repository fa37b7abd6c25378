"""Base of the U-AND configs: saelab's strict models, also strict when built directly.

U-AND code and users build configs as `DataConfig(m=100, s=3)` rather than through `parse`, so
construction itself turns pydantic's error into saelab's one-line `ConfigError` naming the field.
Types are strict: a string, a bool or a fraction where a count belongs is an error, not a cast.
"""

from __future__ import annotations

from pydantic import ConfigDict, ValidationError

from saelab.config import StrictModel, describe_validation_error
from saelab.errors import ConfigError


class UANDConfig(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, type(self))) from None

    def to_dict(self) -> dict:
        return self.model_dump()
