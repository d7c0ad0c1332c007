"""One exception root for darkstore.

Every error a user can cause derives from :class:`DarkstoreError` *and* from the
matching built-in, so ``except FileNotFoundError`` keeps working for callers who
do not know about darkstore (the zarr-python ``errors.py`` habit).
"""

from __future__ import annotations


class DarkstoreError(Exception):
    """Root of every error darkstore raises on purpose."""


# --- stores -----------------------------------------------------------------
class StoreNotFoundError(DarkstoreError, FileNotFoundError):
    """No darkstore store at the given path."""


class StoreExistsError(DarkstoreError, FileExistsError):
    """A store already exists at the path and belongs to another job."""


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
    """A teacher produced NaN or Inf logits."""


# --- specs, models and data -------------------------------------------------
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


class RunDirError(DarkstoreError, ValueError):
    """A run directory is not a finished run, holds another run, or has a checkpoint that does not fit."""


class ExportError(DarkstoreError, RuntimeError):
    """An export could not be written, or its reload disagrees with the student."""


class LimitExceededError(DarkstoreError, ValueError):
    """A request is over one of the service's submit-time limits (parameters, memory, input size, time)."""
