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

A store's rows are samples of classes, or fixed-length token sequences (``meta.sequence``): then a
*per-position* field gains a position axis after its row axis, and ``tokens`` and ``loss_mask`` replace
``labels``. The target fields come from the target forms (:mod:`storage.forms`), one module per form.

To add a field: declare it here — a row field is then created, validated, written by
``StoreWriter.write_chunk(i, <name>=array)``, checksummed and read by ``StoreReader.read(rows,
[<name>])`` with the others — and write its producer and its consumer. Nothing else changes
(``tests/test_store.py`` adds one this way).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .fieldspec import FieldSpec, index_dtype
from .forms import FORMS, form_of
from .schema import StoreMeta

__all__ = ["FIELDS", "BY_NAME", "FieldSpec", "target_fields", "row_fields", "present"]

def _always(meta: StoreMeta) -> bool:
    return True


def _classes(m: StoreMeta) -> bool:
    return m.sequence is None


def _sequences(m: StoreMeta) -> bool:
    return m.sequence is not None


FIELDS: tuple[FieldSpec, ...] = (
    *(f for form in FORMS.values() for f in form.fields),
    FieldSpec("members", ("member", "row", "class"), lambda m: (m.num_members, m.num_rows, m.num_classes),
              lambda m: m.dtype, np.nan, lambda m: m.keep_members, row_axis=1, target=True, log_space=True,
              doc="each teacher's own logits, row-centred", when="keep_members"),
    FieldSpec("features", ("row", "feature"), lambda m: (m.num_rows, m.feature_size), lambda m: m.dtype, np.nan,
              lambda m: bool(m.features), target=True,
              doc="kept teacher layers (FitNets' hints), each reduced and flattened, side by side",
              when="features kept"),
    FieldSpec("labels", ("row",), lambda m: (m.num_rows,), lambda m: "int64", -1, _classes,
              doc="hard labels, -1 where unlabeled", when="classes"),
    FieldSpec("tokens", ("row", "token"), lambda m: (m.num_rows, m.sequence.length + 1), index_dtype, 0, _sequences,
              doc="a sequence row's token ids: the inputs are tokens[:-1], position t's label is tokens[t + 1]",
              when="token sequences"),
    FieldSpec("loss_mask", ("row", "position"), lambda m: (m.num_rows, m.sequence.length), lambda m: "uint8", 0,
              _sequences, doc="1 where a position's label and targets carry a loss (0: padding, prompt)",
              when="token sequences"),
    FieldSpec("index", ("row",), lambda m: (m.num_rows,), lambda m: "int64", -1, _always,
              doc="the sample of each row (its position in the transfer set)"),
    FieldSpec("view_params", ("row", "param"), lambda m: (m.num_rows, m.num_view_params), lambda m: "float64",
              np.nan, lambda m: bool(m.views), doc="recorded views: each row's drawn parameters",
              when="recorded views"),
    FieldSpec("stats", ("chunk", "stat"), lambda m: (m.n_chunks, 2 + m.num_members), lambda m: "int64", 0, _always,
              per_row=False, compressed=False,
              doc="per chunk: labeled rows (positions), ensemble correct, each member's correct (top-1)"),
    FieldSpec("nll", ("chunk", "stat"), lambda m: (m.n_chunks, 1 + m.num_members), lambda m: "float64", 0.0,
              _sequences, per_row=False, compressed=False,
              doc="per chunk: the ensemble's and each member's summed negative log-likelihood (nats) of the "
                  "labels at the positions with a loss (a member's: those of teacher_positions), at T = 1",
              when="token sequences"),
    FieldSpec("teacher_positions", ("chunk",), lambda m: (m.n_chunks,), lambda m: "int64", 0, _sequences,
              per_row=False, compressed=False,
              doc="per chunk: the positions with a loss that each teacher's own statistics (its top-1 count in "
                  "stats, its NLL) cover: one in teacher_stride (the sequence record)", when="token sequences"),
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
    """A field's zarr filters and compressors. In a sequence store, ids kept in ascending order are stored as
    their differences, and multi-byte values byte-shuffled before compression (what makes a kept top-k entry
    about 2 bytes: bench/lm.py); a store of classes keeps the plain codecs it always had."""
    if not f.compressed or not compressors:
        return None, None
    if meta.sequence is None:
        return None, compressors
    from zarr.codecs.numcodecs import Delta, Shuffle

    dtype = np.dtype(f.dtype(meta))
    filters = [Delta(dtype=dtype.str)] if f.sorted_ids else None
    shuffle = [Shuffle(elementsize=dtype.itemsize)] if dtype.itemsize > 1 else []
    return filters, (*shuffle, *compressors)


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
    """Uncompressed bytes one row costs: its targets (the form's, :mod:`storage.forms`), members, features,
    index and view parameters, and its label (classes) or its tokens and loss mask (sequences)."""
    item = meta.item_bytes
    targets = form_of(meta).target_bytes(meta) * meta.positions_per_row
    if meta.sequence is not None:
        length = meta.sequence.length
        return targets + np.dtype(index_dtype(meta)).itemsize * (length + 1) + length + 8
    members = meta.num_members if meta.keep_members else 0
    return targets + item * (meta.num_classes * members + meta.feature_size) + 16 + 8 * meta.num_view_params
