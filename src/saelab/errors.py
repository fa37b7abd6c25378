"""Errors a user can act on: each message names what was wrong and how to fix it."""


class SaelabError(Exception):
    """Base class for saelab's user-facing errors."""


class ConfigError(SaelabError, ValueError):
    """A setting is impossible or unknown; raised before any training starts."""


class FileFormatError(SaelabError, ValueError):
    """A saved file is missing, truncated, or does not match what was asked for."""


class NonFiniteError(SaelabError, RuntimeError):
    """Activations or the loss became NaN/Inf during training."""
