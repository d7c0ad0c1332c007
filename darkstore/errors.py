"""The root of every error darkstore raises on purpose, and the errors of what both halves share
(specs, models and weights, transfer sets, path policy).

Each package adds its own errors beside its code (``storage.errors`` for stores,
``teacher_service.errors``, ``student_trainer.errors``), all deriving from :class:`DarkstoreError`
*and* from the matching built-in, so ``except FileNotFoundError`` keeps working for callers who
do not know darkstore (the zarr-python ``errors.py`` habit).
"""

from __future__ import annotations


class DarkstoreError(Exception):
    """Root of every error darkstore raises on purpose."""


class SpecError(DarkstoreError, ValueError):
    """A job, ensemble, data or training spec is malformed."""


class UnknownArchitectureError(SpecError):
    """An architecture name is neither a built-in nor a torchvision classifier."""


class ClassCountMismatchError(SpecError):
    """Ensemble members (or data and members) disagree on the number of classes."""


class WeightsNotFoundError(DarkstoreError, FileNotFoundError):
    """A weight file does not exist."""


class WeightsError(DarkstoreError, ValueError):
    """A weight file is corrupt or does not fit its architecture."""


class UnsafeWeightsError(DarkstoreError, PermissionError):
    """A weight file would need code execution (pickle) to load."""


class CodeNotAllowedError(DarkstoreError, PermissionError):
    """A code-carrying format was requested but the operator did not allow code."""


class DataNotFoundError(DarkstoreError, FileNotFoundError):
    """A transfer set's files cannot be found or read."""


class DataError(DarkstoreError, ValueError):
    """A transfer set's files exist but are malformed (truncated, empty, not what their name says)."""


class PathOutsideRootsError(DarkstoreError, PermissionError):
    """A path resolves outside the configured data roots."""


def error_class(name: str) -> type[DarkstoreError]:
    """The :class:`DarkstoreError` subclass called ``name`` (of any imported package), else the root: how an
    error that crossed a process boundary by name (a Celery result) is raised again as itself."""
    stack: list[type[DarkstoreError]] = [DarkstoreError]
    while stack:
        cls = stack.pop()
        if cls.__name__ == name:
            return cls
        stack.extend(cls.__subclasses__())
    return DarkstoreError


__all__ = ["DarkstoreError", "error_class", "SpecError", "UnknownArchitectureError", "ClassCountMismatchError",
           "WeightsNotFoundError", "WeightsError", "UnsafeWeightsError", "CodeNotAllowedError", "DataNotFoundError",
           "DataError", "PathOutsideRootsError"]
