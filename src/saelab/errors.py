"""Errors a user can act on: each message names what was wrong and how to fix it."""


class SaelabError(Exception):
    """Base class for saelab's user-facing errors."""


class ConfigError(SaelabError, ValueError):
    """A setting is impossible or unknown; raised before any training starts."""


class FileFormatError(SaelabError, ValueError):
    """A saved file is missing, truncated, or does not match what was asked for."""


class NonFiniteError(SaelabError, RuntimeError):
    """Activations or the loss became NaN/Inf during training."""


class WriteError(SaelabError, OSError):
    """A file could not be written (disk full, read-only, permissions); what was there is kept."""


class FolderInUseError(SaelabError, RuntimeError):
    """Another saelab process is writing to the same run folder."""


class TrainingInterrupted(SaelabError):
    """SIGINT (Ctrl-C) or SIGTERM stopped training; `signal` is the signal's number. With a run
    folder a checkpoint was written first, so running the same command again resumes."""

    def __init__(self, message: str, signal: int):
        super().__init__(message)
        self.signal = signal


class SaelabWarning(UserWarning):
    """Something was skipped or repaired so the run could go on (a damaged checkpoint, a bad log line)."""
