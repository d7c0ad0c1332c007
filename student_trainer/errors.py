"""The trainer's errors, rooted in the shared kernel's :class:`~darkstore.errors.DarkstoreError`."""

from __future__ import annotations

from darkstore.errors import DarkstoreError


class RunDirError(DarkstoreError, ValueError):
    """A run directory is not a finished run, holds another run, or has a checkpoint that does not fit."""


class ExportError(DarkstoreError, RuntimeError):
    """An export could not be written, or its reload disagrees with the student."""


__all__ = ["RunDirError", "ExportError"]
