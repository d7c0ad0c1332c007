"""The teacher service's errors, rooted in the shared kernel's :class:`~darkstore.errors.DarkstoreError`."""

from __future__ import annotations

from darkstore.errors import DarkstoreError


class LimitExceededError(DarkstoreError, ValueError):
    """A request is over one of the service's submit-time limits (parameters, memory, input size, time)."""


__all__ = ["LimitExceededError"]
