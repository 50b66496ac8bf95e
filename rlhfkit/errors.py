"""Errors a user can fix: the CLI prints them as one line (exit 2) instead of a traceback.

Every message names what is wrong (file, row, field, key) and what is accepted. `rlhfkit ... --debug` shows the
traceback as well.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: a setting, a data file, a model path, a checkpoint."""


class DataError(UserError):
    """A data file that cannot be read or has a bad row (the message names the file, row and field)."""


class ModelNotFoundError(UserError, ValueError):
    """A model name or path that names no loadable model."""


class CheckpointError(UserError):
    """A checkpoint that is damaged or missing (the message names the file)."""


class DiskError(UserError):
    """A write that failed for lack of space, a read-only file system or a missing permission (the message names
    the path and what to free or change; nothing half-written is kept). `errno`: the cause's error number."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class DiskFullError(DiskError):
    """A write that failed for lack of space; the previous checkpoint is intact."""


class UsageError(UserError):
    """A bad command-line argument (the message names it); the command line prints it as one line, exit 2."""


class RunLockedError(UserError):
    """A log folder already in use by another running process."""


class NonFiniteError(UserError):
    """Training produced NaN or infinite losses or gradients for too many steps in a row."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist."""
