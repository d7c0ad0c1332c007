"""The store's errors, rooted in the shared kernel's :class:`~darkstore.errors.DarkstoreError`.

Each derives from the matching built-in too (``StoreNotFoundError`` is a ``FileNotFoundError``)."""

from __future__ import annotations

from darkstore.errors import DarkstoreError


class StoreNotFoundError(DarkstoreError, FileNotFoundError):
    """No darkstore store at the given location."""


class StoreExistsError(DarkstoreError, FileExistsError):
    """A store already exists at the location and belongs to another job."""


class StoreURLError(DarkstoreError, ValueError):
    """A store location is malformed, has an unknown scheme, or needs a package that is not installed."""


class StoreAccessError(DarkstoreError, OSError):
    """A remote store cannot be reached (no credentials, no bucket, access refused)."""


class SchemaError(DarkstoreError, ValueError):
    """The store's layout or attributes do not follow the schema."""


class CorruptChunkError(SchemaError):
    """A committed chunk's bytes are not what was written (changed, swapped, truncated or lost)."""


class IncompleteStoreError(DarkstoreError, RuntimeError):
    """The store still has chunks without a commit mark."""


class TransferSetMismatchError(DarkstoreError, ValueError):
    """A transfer set is not the one the store was generated from."""


class NonFiniteLogitsError(DarkstoreError, ArithmeticError):
    """Teacher targets hold NaN or Inf (refused on write and on read)."""


__all__ = ["StoreNotFoundError", "StoreExistsError", "StoreURLError", "StoreAccessError", "SchemaError",
           "CorruptChunkError", "IncompleteStoreError", "TransferSetMismatchError", "NonFiniteLogitsError"]
