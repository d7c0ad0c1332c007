"""Write a store: allocate the full shape once, then commit whole chunks.

A chunk is written in this order: its row fields (logits, members, labels, index,
view parameters), stats, the CRC32C of each row field (schema 2), and only then
its ``done`` mark. A writer killed at any point leaves at worst a chunk
without a mark, which the next run rewrites; rewriting a chunk with the same
data is harmless, so duplicate delivery of work is safe.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ._zarr import create, open_group, store_attrs, unfinished_creation
from .errors import NonFiniteLogitsError, SchemaError, StoreExistsError, StoreNotFoundError
from .fields import BY_NAME, FieldSpec, checksum, checksum_names, present, row_fields
from .location import Location
from .schema import StoreMeta, chunk_bounds

#: float16 cannot hold values below this; row-centred logits are clipped here.
#: exp(-60000 / T) is 0 in float64 for any T < 80, so nothing a softmax sees changes.
FLOAT16_FLOOR = -60000.0
FLOAT16_MAX = 65504.0  # the largest finite float16


def _create(loc: Location, meta: StoreMeta) -> None:
    if meta.schema_version >= 2 and meta.checksums is None:
        meta = meta.model_copy(update={"checksums": checksum_names(meta)})
    create(loc, meta)


class StoreWriter:
    """Writes the chunks of one store. Safe to use from several processes at once,
    provided no chunk is handed to two of them at the same time."""

    def __init__(self, where: str | Path | Location):
        self.location = Location.parse(where)
        self.path = str(self.location)
        self.group, self.meta = open_group(self.location, mode="r+")
        self._arrays = {f.name: self.group[f.name] for f in present(self.meta)}

    # -- creation -------------------------------------------------------------
    @classmethod
    def open_or_create(cls, where: str | Path | Location, meta: StoreMeta, *, overwrite: bool = False) -> "StoreWriter":
        """Open the store for ``meta``'s job, creating it if absent.

        An existing store of the same job (same ``job_key``) is reopened so that the
        job resumes; one of another job is an error unless ``overwrite``. What a crashed
        creation left behind is replaced.
        """
        loc = Location.parse(where)
        attrs = store_attrs(loc)
        if attrs is not None:
            _, existing = open_group(loc)
            if existing.job_key == meta.job_key:
                return cls(loc)
            if not overwrite:
                raise StoreExistsError(
                    f"{loc} holds another job's store (job {existing.job_key[:12]}, this one "
                    f"{meta.job_key[:12]}); choose another --out or pass --overwrite"
                )
            loc.remove()
        elif not loc.is_empty():
            if store_attrs(loc) is not None:  # a racing creator finished in between: open (or refuse) its store
                return cls.open_or_create(loc, meta, overwrite=overwrite)
            if not (overwrite or unfinished_creation(loc)):
                raise StoreExistsError(f"{loc} exists and is not a darkstore store; refusing to write there")
            if loc.local is not None and loc.local.is_file():
                loc.local.unlink()
            else:
                loc.remove()
        _create(loc, meta)
        return cls(loc)

    @classmethod
    def open_when_created(cls, where: str | Path | Location, meta: StoreMeta, *, timeout: float,
                          poll: float = 0.5, who: str = "this process") -> "StoreWriter":
        """Open ``meta``'s store once another process has created it (a shard other than the first, which
        creates it: on object stores two creators must not race). Refuses another job's store; waits at
        most ``timeout`` seconds."""
        loc = Location.parse(where)
        deadline = time.monotonic() + timeout
        while True:
            if store_attrs(loc) is not None:
                _, existing = open_group(loc)
                if existing.job_key != meta.job_key:
                    raise StoreExistsError(f"{loc} holds another job's store (job {existing.job_key[:12]}, this one "
                                           f"{meta.job_key[:12]}): the shards of one store must run the same job")
                return cls(loc)
            if time.monotonic() >= deadline:
                raise StoreNotFoundError(f"{who} waited {timeout:g} s for the store at {loc} to be created; the first "
                                         "shard (0/N) creates it: start it, or give the others a longer wait")
            time.sleep(poll)

    # -- state ----------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        return self._arrays["done"][:].astype(bool)

    def pending_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    def bounds(self, i: int) -> tuple[int, int]:
        return chunk_bounds(i, self.meta.chunk_rows, self.meta.num_rows)

    # -- writing --------------------------------------------------------------
    def write_chunk(self, i: int, *, stats: np.ndarray | None = None, nll: np.ndarray | None = None,
                    teacher_positions: int | None = None, engine_counts: np.ndarray | None = None,
                    reference_kl: np.ndarray | None = None, **fields: np.ndarray | None) -> None:
        """Write chunk ``i`` whole and commit it: one array per row field the store declares (``logits``,
        ``labels``, ``index``, and ``members``/``view_params`` where present), shaped as that field's rows of
        this chunk. Target fields (logits, members) come row-centred in float32/float64 and are refused when
        not finite, then clipped and cast to the store's dtype; the others are cast to their field's dtype."""
        start, stop = self.bounds(i)
        values = {f.name: self._encode(f, fields.pop(f.name, None), i, start, stop) for f in row_fields(self.meta)}
        unknown = sorted(k for k, v in fields.items() if v is not None)
        if unknown:
            raise SchemaError(f"{self.path} has no row field {', '.join(unknown)} (it has {', '.join(values)})")
        a = self._arrays
        for name, v in values.items():
            if BY_NAME[name].row_axis == 1:
                a[name][:, start:stop] = v
            else:
                a[name][start:stop] = v
        if stats is not None:
            a["stats"][i] = np.asarray(stats, dtype=np.int64)
        if nll is not None:
            a["nll"][i] = np.asarray(nll, dtype=np.float64)
        if teacher_positions is not None:
            a["teacher_positions"][i] = teacher_positions
        if engine_counts is not None:
            a["engine_counts"][i] = np.asarray(engine_counts, dtype=np.int64)
        if reference_kl is not None:
            a["reference_kl"][i] = np.asarray(reference_kl, dtype=np.float64)
        if self.meta.checksums is not None:  # schema 2: what was written, before the commit mark
            a["checksums"][i] = np.array([checksum(values[n]) for n in self.meta.checksums], dtype=np.uint32)
        a["done"][i] = 1  # the commit mark, strictly last

    def _encode(self, f: FieldSpec, x: np.ndarray | None, i: int, start: int, stop: int) -> np.ndarray:
        if x is None:
            raise SchemaError(f"this store has the row field {f.name} ({f.doc}); write_chunk needs {f.name}=")
        x = np.asarray(x)
        _check_shape(f.name, x, f.chunk_shape(self.meta, stop - start))
        dtype = np.dtype(f.dtype(self.meta))
        if not f.target:
            return x.astype(dtype, copy=False)
        finite = np.isfinite(x)
        if not finite.all():
            rows_ok = finite.all(axis=tuple(a for a in range(x.ndim) if a != f.row_axis))
            raise NonFiniteLogitsError(f"non-finite {f.name} in rows {_rows(np.flatnonzero(~rows_ok) + start)}; "
                                       f"chunk {i} not written")
        if x.dtype == dtype:  # already cast (and clipped) by the caller
            return x
        if dtype == np.float16 and f.log_space:
            return np.clip(x, FLOAT16_FLOOR, None).astype(np.float16)
        if dtype == np.float16 and x.size and float(np.abs(x).max()) > FLOAT16_MAX:
            raise NonFiniteLogitsError(f"{f.name} values reach {float(np.abs(x).max()):.4g}, beyond float16's "
                                       f"{FLOAT16_MAX:g}, in chunk {i}; store them as float32 (dtype float32)")
        return x.astype(dtype)

def _check_shape(name: str, x: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise SchemaError(f"{name} has shape {tuple(x.shape)}, chunk needs {shape}")


def _rows(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f" … ({len(rows)} rows)" if len(rows) > limit else "")


_OPEN: dict[str, StoreWriter] = {}


def write_chunk_at(path: str, i: int, kw: dict) -> None:
    """:meth:`StoreWriter.write_chunk` in a writer process (one writer per store per process);
    imports only numpy and zarr, so a spawned writer starts quickly."""
    w = _OPEN.get(path)
    if w is None:
        w = _OPEN[path] = StoreWriter(path)
    w.write_chunk(i, **kw)
