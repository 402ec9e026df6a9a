"""Errors a user can cause.

Every exception here carries a message that names the file, line, key or tensor at fault; the CLI
prints it on one line and exits with status 2. Anything else that escapes is our bug and keeps its
traceback.
"""


class NeoxtError(Exception):
    """Base class for user-facing errors (bad config, bad data, bad checkpoint...)."""


class ConfigError(NeoxtError):
    """A config file, key or value is wrong. Messages start with ``config error:``."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith("config error") else f"config error: {message}")


class DataError(NeoxtError):
    """A data file (JSONL, Parquet, .bin/.idx, label file) is malformed or inconsistent."""


class CheckpointError(NeoxtError):
    """A checkpoint is missing, incomplete, or does not match the model or config."""


class ConversionError(NeoxtError):
    """A conversion between checkpoint formats cannot proceed (unknown architecture, bad shapes)."""


class OutputError(NeoxtError):
    """An output cannot be written (read-only or full file system, a file where a directory belongs)."""
