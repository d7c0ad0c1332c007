"""Read a store: schema and completeness checks, chunk iteration, row access."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ._zarr import open_group
from .errors import CorruptChunkError, IncompleteStoreError, NonFiniteLogitsError, SchemaError
from .fields import BY_NAME, all_finite, bytes_per_row, checksum, row_fields
from .location import Location
from .forms import TargetsRecord
from .schema import StoreMeta, chunk_bounds


@dataclass
class Chunk:
    """The rows of one committed chunk."""

    i: int
    start: int
    stop: int
    logits: np.ndarray  # [rows, C], the store's dtype
    labels: np.ndarray  # [rows] int64
    index: np.ndarray  # [rows] int64
    members: np.ndarray | None = None  # [M, rows, C]


class StoreReader:
    """Read-only view of a store.

    By default a store with any chunk lacking its commit mark is refused with
    :class:`IncompleteStoreError`; ``allow_incomplete=True`` reads the finished part
    (only committed chunks are ever returned).
    """

    def __init__(self, where: str | Path | Location, *, allow_incomplete: bool = False):
        self.location = Location.parse(where)
        self.path = str(self.location)  # the canonical spelling: a local path or a URL
        self.group, self.meta = open_group(self.location, mode="r")
        self.done = self.group["done"][:].astype(bool)
        self._sums: np.ndarray | None = None
        self._arrays: dict[str, Any] = {}
        if not allow_incomplete and not self.complete:
            raise IncompleteStoreError(
                f"{self.path} is incomplete: {int(self.done.sum())} of {self.meta.n_chunks} chunks committed "
                f"({self.rows_done} of {self.meta.num_rows} rows). Resume the job, or read the finished part "
                "with allow_incomplete=True / --allow-incomplete."
            )

    # -- state ----------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def rows_done(self) -> int:
        return int(sum(b - a for a, b in map(self.bounds, self.finished_chunks())))

    def finished_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.done)]

    def finished_rows(self) -> np.ndarray:
        """Row numbers of every committed row, ascending."""
        parts = [np.arange(*self.bounds(i)) for i in self.finished_chunks()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def bounds(self, i: int) -> tuple[int, int]:
        return chunk_bounds(i, self.meta.chunk_rows, self.meta.num_rows)

    # -- data -----------------------------------------------------------------
    def read_chunks(self, chunks: list[int], fields: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
        """Row fields of committed ``chunks``, concatenated along rows in the order given (see
        :meth:`read_chunk_parts`)."""
        parts = self.read_chunk_parts(chunks, fields)
        out: dict[str, np.ndarray] = {}
        for name in fields:
            axis = BY_NAME[name].row_axis
            if len(parts) == 1:
                out[name] = parts[0][name]
            elif parts:
                out[name] = np.concatenate([p[name] for p in parts], axis=axis)
            else:
                shape = list(self.array(name).shape)
                shape[axis] = 0
                out[name] = np.zeros(shape, self.array(name).dtype)
        return out

    def read_chunk_parts(self, chunks: list[int], fields: tuple[str, ...] | list[str]) -> list[dict[str, np.ndarray]]:
        """Row fields of committed ``chunks``, one mapping per chunk in the order given: every (field, chunk)
        read as a whole chunk object, all of them concurrently in one call into zarr; every chunk checked
        against its checksum (schema 2) and target fields checked finite. The one way rows leave a store."""
        for c in chunks:
            if not self.done[c]:
                raise IncompleteStoreError(f"chunk {c} of {self.path} is not committed")
        bounds = [self.bounds(c) for c in chunks]
        specs = []
        for name in fields:
            f = BY_NAME[name]
            if not f.per_row or not f.present(self.meta):
                raise SchemaError(f"{self.path} has no row field {name!r}"
                                  + (" (generated without --keep-members)" if name == "members" else ""))
            specs.append((name, f))
        try:
            parts = _read_blocks([(self.array(name), f.row_axis, a, b) for name, f in specs for a, b in bounds])
        except Exception as exc:  # noqa: BLE001 — a truncated or corrupt chunk object: zarr/numcodecs raise many types
            name, bad = next(((n, c) for n, _ in specs for c in chunks if not self._readable(n, c)),
                             (specs[0][0], chunks[0]) if specs and chunks else ("?", -1))
            raise CorruptChunkError(f"chunk {bad} of {self.path}: field {name} cannot be read "
                                    f"({type(exc).__name__}: {exc}). {REGENERATE}") from exc
        out: list[dict[str, np.ndarray]] = [{} for _ in chunks]
        for j, (name, f) in enumerate(specs):
            for k, c in enumerate(chunks):
                values = parts[j * len(chunks) + k]
                self._check(c, name, values)
                out[k][name] = values
        return out

    def array(self, name: str):
        """A field's zarr array, opened once per reader (opening one costs a metadata read)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

    def read(self, rows: np.ndarray, fields: tuple[str, ...] | list[str] = ("logits",)) -> dict[str, np.ndarray]:
        """Row fields of arbitrary committed rows, in the order given (whole chunks are read and checked)."""
        rows = np.asarray(rows, dtype=np.int64)
        chunk_of = rows // self.meta.chunk_rows
        chunks = [int(c) for c in np.unique(chunk_of)]
        got = self.read_chunks(chunks, fields)
        starts = np.zeros(self.meta.n_chunks + 1, dtype=np.int64)
        at = 0
        for c in chunks:
            a, b = self.bounds(c)
            starts[c] = at - a
            at += b - a
        pos = rows + starts[chunk_of]
        return {k: (v[:, pos] if BY_NAME[k].row_axis == 1 else v[pos]) for k, v in got.items()}

    def read_field(self, name: str) -> np.ndarray:
        """A row field whole ([N, ...]; rows of uncommitted chunks hold the field's fill), committed chunks checked."""
        f = BY_NAME[name]
        done = self.finished_chunks()
        if len(done) == self.meta.n_chunks:
            return self.read_chunks(done, [name])[name]
        full = np.full(f.shape(self.meta), f.fill_for(self.meta), dtype=f.dtype(self.meta))  # uncommitted rows are never read
        if done:
            got = self.read_chunks(done, [name])[name]
            sel = np.concatenate([np.arange(*self.bounds(c)) for c in done])
            if f.row_axis == 1:
                full[:, sel] = got
            else:
                full[sel] = got
        return full

    def _checksums(self) -> np.ndarray | None:
        if self.meta.checksums is None:
            return None
        if self._sums is None:
            self._sums = np.asarray(self.group["checksums"][:])
        return self._sums

    def _check(self, c: int, name: str, values: np.ndarray) -> None:
        sums = self._checksums()
        if sums is not None and name in self.meta.checksums:
            want = int(sums[c, self.meta.checksums.index(name)])
            got = checksum(values)
            if got != want:
                raise CorruptChunkError(
                    f"chunk {c} of {self.path}: field {name} does not match the checksum written with it "
                    f"(CRC32C {got:08x}, written {want:08x}): it was changed, swapped with another chunk, or lost "
                    f"after its commit. {REGENERATE}")
        if BY_NAME[name].target and not all_finite(values):
            raise NonFiniteLogitsError(f"chunk {c} of {self.path}: field {name} holds non-finite values; a student "
                                       f"must not train on them. {REGENERATE}")

    def _readable(self, name: str, c: int) -> bool:
        a, b = self.bounds(c)
        try:
            BY_NAME[name].rows(self.array(name), a, b)
        except Exception:  # noqa: BLE001
            return False
        return True

    def read_chunk(self, i: int, *, members: bool = False) -> Chunk:
        if members and not self.meta.keep_members:
            raise SchemaError(f"{self.path} was generated without --keep-members")
        start, stop = self.bounds(i)
        got = self.read_chunks([i], ["logits", "labels", "index"] + (["members"] if members else []))
        return Chunk(i, start, stop, got["logits"], got["labels"], got["index"], got.get("members"))

    def iter_chunks(self, *, members: bool = False) -> Iterator[Chunk]:
        for i in self.finished_chunks():
            yield self.read_chunk(i, members=members)

    def read_all(self, *, members: bool = False) -> Chunk:
        """Every committed row at once (the finished part of an incomplete store)."""
        chunks = list(self.iter_chunks(members=members))
        if not chunks:
            raise IncompleteStoreError(f"{self.path} has no committed chunk yet")
        cat = np.concatenate
        return Chunk(
            -1, 0, self.meta.num_rows,
            cat([c.logits for c in chunks]), cat([c.labels for c in chunks]), cat([c.index for c in chunks]),
            cat([c.members for c in chunks], axis=1) if members else None,
        )

    def read_rows(self, rows: np.ndarray, *, members: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (and members) of arbitrary committed rows, in the order given."""
        if members and not self.meta.keep_members:
            raise SchemaError(f"{self.path} was generated without --keep-members")
        got = self.read(rows, ["logits"] + (["members"] if members else []))
        return got["logits"], got.get("members")

    # -- derived facts ----------------------------------------------------------
    def accuracy(self) -> dict[str, float] | None:
        """Accuracy of the ensemble and of each teacher on the labeled committed rows."""
        stats = self.group["stats"][:][self.done]
        labeled = int(stats[:, 0].sum())
        if labeled == 0:
            return None
        acc = {"ensemble": float(stats[:, 1].sum() / labeled)}
        own = self.meta.kind.teacher_positions(self)
        own = labeled if own is None else own
        for j, t in enumerate(self.meta.teachers if own else ()):
            acc[t.name] = float(stats[:, 2 + j].sum() / own)
        acc["labeled_rows"] = labeled
        return acc

    def perplexity(self) -> dict[str, float] | None:
        """A sequence store's per-token perplexity of the ensemble (its stored distribution at the generation
        temperature) over the committed positions with a loss, and of each teacher over those its statistics
        cover (one position in ``teacher_stride``), exp(mean NLL)."""
        return self.meta.kind.perplexity(self)

    def verify(self) -> None:
        """Deep check: every committed chunk of every row field reads back, matches its checksum
        (schema 2), holds finite targets and in-range sample indices. Raises naming the chunk and field."""
        names = [f.name for f in row_fields(self.meta)]
        for i in self.finished_chunks():
            got = self.read_chunks([i], names)
            index = got["index"]
            wrong = self.meta.kind.check_chunk(got, self.meta)
            if wrong:
                raise CorruptChunkError(f"chunk {i} of {self.path}: {wrong}. {REGENERATE}")
            if (index < 0).any() or (index >= self.meta.transfer_set.num_samples).any():
                raise CorruptChunkError(f"chunk {i} of {self.path}: field index has row indices outside the "
                                        f"transfer set. {REGENERATE}")

    def summary(self) -> dict[str, Any]:
        m = self.meta
        size = self.location.size_bytes()
        return {
            "path": str(self.path),
            "rows": m.num_rows,
            "classes": m.num_classes,
            "dtype": m.dtype,
            "kind": m.kind.name,
            "targets": str(m.targets or TargetsRecord()),
            "targets_record": m.targets.model_dump() if m.targets else None,
            "compressor": m.compressor,
            "chunk_rows": m.chunk_rows,
            "chunks": m.n_chunks,
            "chunks_done": int(self.done.sum()),
            "rows_done": self.rows_done,
            "complete": self.complete,
            "combine": m.combine,
            "temperature": m.temperature,
            "specialists": m.specialists.model_dump() if m.specialists else None,
            "specialist_of": m.specialist_of.model_dump() if m.specialist_of else None,
            "keep_members": m.keep_members,
            "disk_bytes": size,
            "samples": m.transfer_set.num_samples,
            "views_per_sample": m.views_per_sample,
            "view_params": m.views.param_names if m.views else None,
            "augment": m.views.recipe if m.views else None,
            "bytes_per_row": size / m.num_rows,
            "raw_bytes_per_row": bytes_per_row(m),
            "bytes_per_sample": size / m.transfer_set.num_samples,
            "raw_bytes_per_sample": bytes_per_row(m) * m.views_per_sample,
            "features": [{"name": f.name, "shape": f.shape, "reduction": f.reduction(),
                          "raw_bytes_per_row": f.size * m.item_bytes}
                         for f in m.features or ()],
            "teachers": [t.model_dump() for t in m.teachers],
            "transfer_set": m.transfer_set.model_dump(),
            "accuracy": self.accuracy(),
            "sequence": m.kind.record(m),
            "perplexity": self.perplexity(),
            "values": m.values,
            "engine": m.kind.engine_summary(self),
            "job_key": m.job_key,
            "created_at": m.created_at,
            "software_version": m.software_version,
        }


REGENERATE = ("Regenerate the chunk: delete its commit mark (done/c/<chunk>) and resume the job, which "
              "recomputes exactly the uncommitted chunks")


def _read_blocks(reads: list[tuple[Any, int, int, int]]) -> list[np.ndarray]:
    """Each (zarr array, row axis, start, stop) read with a basic slice, all concurrently in one round trip to
    zarr's event loop: chunk-aligned slices decode whole chunk objects, with none of the per-element index
    arithmetic an integer selection costs."""
    from zarr.core.sync import sync

    def selection(arr: Any, axis: int, a: int, b: int) -> tuple[slice, ...]:
        sel = [slice(None)] * arr.ndim
        sel[axis] = slice(a, b)
        return tuple(sel)

    async def gather() -> list[Any]:
        return await asyncio.gather(*[arr.async_array.getitem(selection(arr, axis, a, b))
                                      for arr, axis, a, b in reads])

    return [np.asarray(x) for x in sync(gather())] if reads else []


def open_store(where: str | Path | Location, *, allow_incomplete: bool = False) -> StoreReader:
    """Open the store at a local path or URL (``file://``, ``s3://``, ``memory://``) for reading."""
    return StoreReader(where, allow_incomplete=allow_incomplete)


__all__ = ["Chunk", "StoreReader", "StoreMeta", "open_store"]

