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

A store's rows are of one kind (:mod:`storage.kinds`: samples of classes, or fixed-length token sequences
whose *per-position* fields gain a position axis after the row axis); each kind brings its own fields
(``labels``; ``tokens`` and ``loss_mask``). The target fields come from the target forms
(:mod:`storage.forms`), one module per form.

To add a field: declare it here — a row field is then created, validated, written by
``StoreWriter.write_chunk(i, <name>=array)``, checksummed and read by ``StoreReader.read(rows,
[<name>])`` with the others — and write its producer and its consumer. Nothing else changes
(``tests/test_store.py`` adds one this way).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .fieldspec import FieldSpec
from .forms import FORMS, form_of
from .kinds import KINDS
from .schema import StoreMeta

__all__ = ["FIELDS", "BY_NAME", "FieldSpec", "target_fields", "row_fields", "present"]

def _always(meta: StoreMeta) -> bool:
    return True


FIELDS: tuple[FieldSpec, ...] = (
    *(f for form in FORMS.values() for f in form.fields),
    FieldSpec("members", ("member", "row", "class"), lambda m: (m.num_members, m.num_rows, m.num_classes),
              lambda m: m.dtype, np.nan, lambda m: m.keep_members, row_axis=1, target=True, log_space=True,
              doc="each teacher's own logits, row-centred", when="keep_members"),
    FieldSpec("features", ("row", "feature"), lambda m: (m.num_rows, m.feature_size), lambda m: m.dtype, np.nan,
              lambda m: bool(m.features), target=True,
              doc="kept teacher layers (FitNets' hints), each reduced and flattened, side by side",
              when="features kept"),
    *(f for kind in KINDS.values() for f in kind.row_fields),
    FieldSpec("index", ("row",), lambda m: (m.num_rows,), lambda m: "int64", -1, _always,
              doc="the sample of each row (its position in the transfer set)"),
    FieldSpec("view_params", ("row", "param"), lambda m: (m.num_rows, m.num_view_params), lambda m: "float64",
              np.nan, lambda m: bool(m.views), doc="recorded views: each row's drawn parameters",
              when="recorded views"),
    FieldSpec("stats", ("chunk", "stat"), lambda m: (m.n_chunks, 2 + m.num_members), lambda m: "int64", 0, _always,
              per_row=False, compressed=False,
              doc="per chunk: labeled rows (positions), ensemble correct, each member's correct (top-1)"),
    *(f for kind in KINDS.values() for f in kind.chunk_fields),
    FieldSpec("checksums", ("chunk", "field"), lambda m: (m.n_chunks, len(m.checksums or ())), lambda m: "uint32", 0,
              lambda m: m.checksums is not None, per_row=False, compressed=False,
              doc="per chunk: CRC32C of each row field's bytes", when="schema 2 and later"),
    FieldSpec("done", ("chunk",), lambda m: (m.n_chunks,), lambda m: "uint8", 0, _always, per_row=False,
              compressed=False, doc="the commit mark, written last"),
)
BY_NAME = {f.name: f for f in FIELDS}


def target_fields(meta: StoreMeta) -> tuple[str, ...]:
    """The row fields that hold ``meta``'s teacher targets (its form's)."""
    return tuple(f.name for f in form_of(meta).fields)


def present(meta: StoreMeta) -> list[FieldSpec]:
    return [f for f in FIELDS if f.present(meta)]


def row_fields(meta: StoreMeta) -> list[FieldSpec]:
    """The store's row fields, in checksum-column order."""
    return [f for f in FIELDS if f.per_row and f.present(meta)]


def checksum_names(meta: StoreMeta) -> list[str]:
    return [f.name for f in row_fields(meta)]


def create_arrays(group: Any, meta: StoreMeta, compressors: Any) -> None:
    for f in present(meta):
        filters, codecs = codecs_for(f, meta, compressors)
        group.create_array(f.name, shape=f.shape(meta), chunks=f.chunks(meta), dtype=f.dtype(meta),
                           filters=filters, compressors=codecs, fill_value=f.fill_for(meta), dimension_names=f.dims_for(meta))


def codecs_for(f: FieldSpec, meta: StoreMeta, compressors: Any) -> tuple[Any, Any]:
    """A field's zarr filters and compressors: the row kind's (a store of classes keeps the plain codecs it
    always had; a sequence store delta-encodes ascending ids and byte-shuffles: :mod:`storage.kinds`)."""
    if not f.compressed or not compressors:
        return None, None
    return meta.kind.codecs(f, meta, compressors)


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


def bytes_per_row(meta: StoreMeta) -> int:
    """Uncompressed bytes one row costs: its targets (the form's, :mod:`storage.forms`) and the rest of its
    fields (the row kind's, :mod:`storage.kinds`: members, features, index, view parameters and a label, or
    tokens and a loss mask)."""
    return form_of(meta).target_bytes(meta) * meta.positions_per_row + meta.kind.own_bytes(meta)
