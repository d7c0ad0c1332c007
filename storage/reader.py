"""Read a store: schema and completeness checks, chunk iteration, row access."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ._zarr import disk_bytes, open_group
from .errors import IncompleteStoreError, NonFiniteLogitsError, SchemaError
from .schema import StoreMeta, bytes_per_row, chunk_bounds


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

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self.group, self.meta = open_group(self.path, mode="r")
        self.logits = self.group["logits"]
        self.labels = self.group["labels"]
        self.index = self.group["index"]
        self.members = self.group["members"] if self.meta.keep_members else None
        self.view_params = self.group["view_params"] if self.meta.views else None  # [N, P] float64
        self.done = self.group["done"][:].astype(bool)
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
    def read_chunk(self, i: int, *, members: bool = False) -> Chunk:
        if not self.done[i]:
            raise IncompleteStoreError(f"chunk {i} of {self.path} is not committed")
        start, stop = self.bounds(i)
        mem = None
        if members:
            if self.members is None:
                raise SchemaError(f"{self.path} was generated without --keep-members")
            mem = self.members[:, start:stop]
        return Chunk(i, start, stop, self.logits[start:stop], self.labels[start:stop], self.index[start:stop], mem)

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
        rows = np.asarray(rows, dtype=np.int64)
        chunk_of = rows // self.meta.chunk_rows
        if rows.size and not self.done[chunk_of].all():
            raise IncompleteStoreError(f"rows requested from uncommitted chunks of {self.path}")
        logits = self.logits.get_orthogonal_selection((rows, slice(None)))
        mem = None
        if members:
            if self.members is None:
                raise SchemaError(f"{self.path} was generated without --keep-members")
            mem = self.members.get_orthogonal_selection((slice(None), rows, slice(None)))
        return logits, mem

    # -- derived facts ----------------------------------------------------------
    def accuracy(self) -> dict[str, float] | None:
        """Accuracy of the ensemble and of each teacher on the labeled committed rows."""
        stats = self.group["stats"][:][self.done]
        labeled = int(stats[:, 0].sum())
        if labeled == 0:
            return None
        acc = {"ensemble": float(stats[:, 1].sum() / labeled)}
        for j, t in enumerate(self.meta.teachers):
            acc[t.name] = float(stats[:, 2 + j].sum() / labeled)
        acc["labeled_rows"] = labeled
        return acc

    def verify(self) -> None:
        """Deep check: every committed chunk reads back, its rows are finite and its indices in range."""
        for i in self.finished_chunks():
            try:
                chunk = self.read_chunk(i, members=self.meta.keep_members)
            except Exception as exc:  # noqa: BLE001 — a truncated or corrupt chunk object: zarr/numcodecs raise many types
                field = next((name for name in ("logits", "members", "labels", "index")
                              if name in str(exc)), None) or self._bad_field(i)
                raise SchemaError(f"chunk {i} of {self.path} cannot be read (field {field}: "
                                  f"{type(exc).__name__}: {exc}); the store is corrupt: regenerate that chunk "
                                  "by deleting its commit mark and resuming the job") from exc
            if not np.isfinite(chunk.logits).all():
                raise NonFiniteLogitsError(f"chunk {chunk.i} of {self.path} holds non-finite logits")
            if chunk.members is not None and not np.isfinite(chunk.members).all():
                raise NonFiniteLogitsError(f"chunk {chunk.i} of {self.path} holds non-finite member logits")
            if (chunk.index < 0).any() or (chunk.index >= self.meta.transfer_set.num_samples).any():
                raise SchemaError(f"chunk {chunk.i} of {self.path} has row indices outside the transfer set")

    def _bad_field(self, i: int) -> str:
        """Which array's chunk ``i`` fails to read."""
        a, b = self.bounds(i)
        for name in ("logits", "labels", "index", "members"):
            arr = getattr(self, name)
            if arr is None:
                continue
            try:
                arr[..., a:b, :] if name == "members" else arr[a:b]
            except Exception:  # noqa: BLE001
                return name
        return "unknown"

    def summary(self) -> dict[str, Any]:
        m = self.meta
        size = disk_bytes(self.path)
        return {
            "path": str(self.path),
            "rows": m.num_rows,
            "classes": m.num_classes,
            "dtype": m.dtype,
            "compressor": m.compressor,
            "chunk_rows": m.chunk_rows,
            "chunks": m.n_chunks,
            "chunks_done": int(self.done.sum()),
            "rows_done": self.rows_done,
            "complete": self.complete,
            "combine": m.combine,
            "temperature": m.temperature,
            "keep_members": m.keep_members,
            "disk_bytes": size,
            "samples": m.transfer_set.num_samples,
            "views_per_sample": m.views_per_sample,
            "view_params": m.views["param_names"] if m.views else None,
            "augment": m.views["recipe"] if m.views else None,
            "bytes_per_row": size / m.num_rows,
            "raw_bytes_per_row": bytes_per_row(m),
            "bytes_per_sample": size / m.transfer_set.num_samples,
            "raw_bytes_per_sample": bytes_per_row(m) * m.views_per_sample,
            "teachers": [t.model_dump() for t in m.teachers],
            "transfer_set": m.transfer_set.model_dump(),
            "accuracy": self.accuracy(),
            "job_key": m.job_key,
            "created_at": m.created_at,
            "software_version": m.software_version,
        }


def open_store(path: str | Path, *, allow_incomplete: bool = False) -> StoreReader:
    return StoreReader(path, allow_incomplete=allow_incomplete)


__all__ = ["Chunk", "StoreReader", "StoreMeta", "open_store"]
