"""How one array of a store is declared (:class:`FieldSpec`); the table of them is :data:`storage.fields.FIELDS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from .schema import StoreMeta


@dataclass(frozen=True)
class FieldSpec:
    """One array of a store.

    ``extent`` gives its shape in a store of classes; a ``per_position`` field gains a position axis right
    after its row axis where the row kind has positions (a store of token sequences: :mod:`storage.kinds`), so
    that one declaration serves every kind."""

    name: str
    dims: tuple[str, ...]
    extent: Callable[[StoreMeta], tuple[int, ...]]
    dtype: Callable[[StoreMeta], str]
    fill: Any
    present: Callable[[StoreMeta], bool]
    per_row: bool = True  # a row field (else one element per chunk)
    row_axis: int = 0
    compressed: bool = True
    target: bool = False  # teacher targets: stored in the store's float dtype, refused when not finite
    log_space: bool = False  # float16: values below the floor are clipped to it (log-probabilities); others refuse overflow
    doc: str = ""
    when: str = "always"  # in words, what ``present`` decides (the docs' field table shows it)
    per_position: bool = False  # sequence stores: one entry per position of each row
    sorted_ids: bool = False  # ascending ids along the last axis in a sequence store: stored delta-encoded

    def shape(self, meta: StoreMeta) -> tuple[int, ...]:
        shape = self.extent(meta)
        length = meta.kind.length(meta) if self.per_position else None
        if length is not None:
            at = self.row_axis + 1
            shape = (*shape[:at], length, *shape[at:])
        return shape

    def fill_for(self, meta: StoreMeta) -> Any:
        """The fill value in this store's dtype (NaN where the field holds integers — quantised values — is 0)."""
        if isinstance(self.fill, float) and self.fill != self.fill and np.dtype(self.dtype(meta)).kind in "iu":
            return 0
        return self.fill

    def dims_for(self, meta: StoreMeta | None) -> tuple[str, ...]:
        """The dimension names (a position axis after the row's in a sequence store, or ``meta`` None: shown)."""
        if not self.per_position or (meta is not None and meta.kind.length(meta) is None):
            return self.dims
        at = self.row_axis + 1
        return (*self.dims[:at], "position", *self.dims[at:])

    def chunks(self, meta: StoreMeta) -> tuple[int, ...]:
        shape = self.shape(meta)
        if not self.per_row:
            return (1, *shape[1:])
        return tuple(meta.chunk_rows if a == self.row_axis else s for a, s in enumerate(shape))

    def chunk_shape(self, meta: StoreMeta, rows: int) -> tuple[int, ...]:
        """The shape of ``rows`` rows of this row field."""
        return tuple(rows if a == self.row_axis else s for a, s in enumerate(self.shape(meta)))

    def rows(self, arr: Any, start: int, stop: int) -> Any:
        """The rows ``[start, stop)`` of this field's array (zarr or numpy)."""
        return arr[:, start:stop] if self.row_axis == 1 else arr[start:stop]


def index_dtype(meta: StoreMeta) -> str:
    """The dtype of stored class or token numbers (the row kind's: int32 for classes, as every such store has
    been; the narrowest that holds a vocabulary for tokens)."""
    return meta.kind.index_dtype(meta)
