"""The store's fields, declared once: what each array holds, its shape, dtype, fill and when it exists.

Creation (:func:`create_arrays`), validation on open (:func:`check_arrays`), the writer's chunk
commits and the reader's checks all come from :data:`FIELDS`. A *row field* holds one entry per
store row and is chunked by ``chunk_rows`` rows along its row axis; chunk *i* of every row field
covers rows ``[i·chunk_rows, (i+1)·chunk_rows)``. A *chunk field* holds one element per chunk,
one object each, so that two writers never touch the same object.

Schema 2 adds ``checksums``: per committed chunk, the CRC32C of each row field's bytes as
written (C order, little-endian, the stored dtype), written before the chunk's ``done`` mark.
Readers verify what they read against it, so a chunk changed, swapped, truncated or lost after
its commit is an error that names the chunk and the field, never silent data.

To add a field: declare it here — a row field is then created, validated, written by
``StoreWriter.write_chunk(i, <name>=array)``, checksummed and read by ``StoreReader.read(rows,
[<name>])`` with the others — and write its producer and its consumer. Nothing else changes
(``tests/test_store.py`` adds one this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .schema import StoreMeta

@dataclass(frozen=True)
class FieldSpec:
    name: str
    dims: tuple[str, ...]
    shape: Callable[[StoreMeta], tuple[int, ...]]
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


def _always(meta: StoreMeta) -> bool:
    return True


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("logits", ("row", "class"), lambda m: (m.num_rows, m.num_classes), lambda m: m.dtype, np.nan,
              lambda m: m.target_form == "dense", target=True, log_space=True, doc="ensemble targets in log space, row-centred", when="dense targets"),
    FieldSpec("topk_logits", ("row", "k"), lambda m: (m.num_rows, m.targets.k), lambda m: m.dtype, np.nan,
              lambda m: m.target_form == "topk", target=True, log_space=True, doc="top-k targets: the k largest ensemble values", when="topk:K targets"),
    FieldSpec("topk_index", ("row", "k"), lambda m: (m.num_rows, m.targets.k), lambda m: "int32", -1,
              lambda m: m.target_form == "topk", doc="top-k targets: their classes, largest first", when="topk:K targets"),
    FieldSpec("tail_lse", ("row",), lambda m: (m.num_rows,), lambda m: "float32", np.nan,
              lambda m: m.target_form == "topk", target=True,
              doc="top-k targets: log-sum-exp of the values left out (the tail's mass at T = 1)", when="topk:K targets"),
    FieldSpec("sample_index", ("row", "k"), lambda m: (m.num_rows, m.targets.k), lambda m: "int32", -1,
              lambda m: m.target_form == "sampled", doc="sampled targets: k classes drawn per row, sorted", when="sampled:K targets"),
    FieldSpec("members", ("member", "row", "class"), lambda m: (m.num_members, m.num_rows, m.num_classes),
              lambda m: m.dtype, np.nan, lambda m: m.keep_members, row_axis=1, target=True, log_space=True,
              doc="each teacher's own logits, row-centred", when="keep_members"),
    FieldSpec("features", ("row", "feature"), lambda m: (m.num_rows, m.feature_size), lambda m: m.dtype, np.nan,
              lambda m: bool(m.features), target=True,
              doc="kept teacher layers (FitNets' hints), each reduced and flattened, side by side",
              when="features kept"),
    FieldSpec("labels", ("row",), lambda m: (m.num_rows,), lambda m: "int64", -1, _always,
              doc="hard labels, -1 where unlabeled"),
    FieldSpec("index", ("row",), lambda m: (m.num_rows,), lambda m: "int64", -1, _always,
              doc="the sample of each row (its position in the transfer set)"),
    FieldSpec("view_params", ("row", "param"), lambda m: (m.num_rows, m.num_view_params), lambda m: "float64",
              np.nan, lambda m: bool(m.views), doc="recorded views: each row's drawn parameters",
              when="recorded views"),
    FieldSpec("stats", ("chunk", "stat"), lambda m: (m.n_chunks, 2 + m.num_members), lambda m: "int64", 0, _always,
              per_row=False, compressed=False, doc="per chunk: labeled rows, ensemble correct, each member's correct"),
    FieldSpec("checksums", ("chunk", "field"), lambda m: (m.n_chunks, len(m.checksums or ())), lambda m: "uint32", 0,
              lambda m: m.checksums is not None, per_row=False, compressed=False,
              doc="per chunk: CRC32C of each row field's bytes", when="schema 2 and later"),
    FieldSpec("done", ("chunk",), lambda m: (m.n_chunks,), lambda m: "uint8", 0, _always, per_row=False,
              compressed=False, doc="the commit mark, written last"),
)
BY_NAME = {f.name: f for f in FIELDS}


#: the row fields that hold a store's teacher targets, by form (``StoreMeta.target_form``)
TARGETS = {"dense": ("logits",), "topk": ("topk_logits", "topk_index", "tail_lse"), "sampled": ("sample_index",)}


def target_fields(meta: StoreMeta) -> tuple[str, ...]:
    return TARGETS[meta.target_form]


def present(meta: StoreMeta) -> list[FieldSpec]:
    return [f for f in FIELDS if f.present(meta)]


def row_fields(meta: StoreMeta) -> list[FieldSpec]:
    """The store's row fields, in checksum-column order."""
    return [f for f in FIELDS if f.per_row and f.present(meta)]


def checksum_names(meta: StoreMeta) -> list[str]:
    return [f.name for f in row_fields(meta)]


def create_arrays(group: Any, meta: StoreMeta, compressors: Any) -> None:
    for f in present(meta):
        group.create_array(f.name, shape=f.shape(meta), chunks=f.chunks(meta), dtype=f.dtype(meta),
                           compressors=compressors if f.compressed else None, fill_value=f.fill,
                           dimension_names=f.dims)


def check_arrays(group: Any, meta: StoreMeta, path: Any, schema_error: type[Exception]) -> None:
    for f in present(meta):
        shape, dtype = f.shape(meta), np.dtype(f.dtype(meta))
        try:
            arr = group[f.name]
        except KeyError:
            raise schema_error(f"{path} lacks the '{f.name}' array") from None
        except (ValueError, TypeError, AttributeError) as exc:  # zarr's parse of a damaged zarr.json
            raise schema_error(
                f"{path}/{f.name}/zarr.json, the '{f.name}' array's metadata, is unreadable ({type(exc).__name__}: "
                f"{exc}); its chunks may be intact: restore that file from a copy of the store, or generate the "
                "store again") from None
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
            raise schema_error(f"{path}/{f.name} is {tuple(arr.shape)} {arr.dtype}, schema says {shape} {dtype}")


def all_finite(x: np.ndarray) -> bool:
    """No NaN or Inf in ``x``. float16 is checked on its exponent bits: numpy's isfinite has no fast path for
    it and would cost ten times the chunk's CRC32C."""
    if x.dtype == np.float16:
        return not ((np.ascontiguousarray(x).view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(x).all())


def checksum(x: np.ndarray) -> int:
    """CRC32C of an array's bytes in C order, little-endian (what a chunk of the field holds)."""
    import google_crc32c

    a = np.ascontiguousarray(x)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return int(google_crc32c.value(a.tobytes()))
