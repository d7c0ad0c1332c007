"""What every student of one store shares (:class:`Inputs`), opened once per process through the store's row
kind (:mod:`student_trainer.kinds`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from darkstore.data import TransferSet
from darkstore.fingerprint import FingerprintPolicy
from storage import StoreReader, open_store

from .kinds import student_kind
from .loader import make_loader
from .recipe import eval_store_warnings, report_mixing


@dataclass(frozen=True)
class Sources:
    """What students train from, opened once for all of them: the store (a directory, a URL or an open reader),
    its transfer set where not the recorded one, the eval store and its inputs, and how they are opened
    (``allow_incomplete``: the finished part of an incomplete store; ``allow_code``; the data ``roots``;
    ``fingerprints``: how transfer sets are checked; ``cache_dir``: where the teachers' timed cost is kept)."""

    store: str | Path | StoreReader
    data: TransferSet | None = None
    eval_store: str | Path | StoreReader | None = None
    eval_data: TransferSet | None = None
    allow_incomplete: bool = False
    allow_code: bool = False
    roots: Sequence[str | Path] | None = None
    fingerprints: FingerprintPolicy | None = None
    cache_dir: Path | None = None

    @classmethod
    def of(cls, sources: "Sources | str | Path | StoreReader") -> "Sources":
        """``sources`` as they are, or a bare store with every other default."""
        return sources if isinstance(sources, Sources) else cls(sources)


class Inputs:
    """What every student of one store shares, opened once per process: the store, its transfer set (checked
    once), the eval store, the row splits, the eval rows (read once), and one loader per distinct batch order
    (students whose batches are the same share one: each batch is read and decoded once for all of them)."""

    def __init__(self, sources: Sources):
        src = self.sources = sources
        self.allow_code, self.roots = src.allow_code, src.roots
        self.cache_dir = src.cache_dir  # where the teachers' measured cost is kept (eval_report.teacher_cost)
        self.reader = (src.store if isinstance(src.store, StoreReader) else
                       open_store(src.store, allow_incomplete=src.allow_incomplete))
        self.meta = self.reader.meta
        self.kind = student_kind(self.meta)
        opened = dict(allow_code=src.allow_code, roots=src.roots, fingerprints=src.fingerprints)
        self.data = self.kind.open_data(self.reader, src.data, **opened)  # None: the rows' inputs are in the store
        self.ev_reader: StoreReader | None = None
        self.ev_data = self.data
        if src.eval_store is not None:
            ev = src.eval_store
            self.ev_reader = ev if isinstance(ev, StoreReader) else open_store(ev)
            self.kind.check_eval_store(self.meta, self.ev_reader)
            self.ev_data = self.kind.open_data(self.ev_reader, src.eval_data, **opened)
        self.has_eval_store = src.eval_store is not None
        self.warnings = eval_store_warnings(self.meta, self.ev_reader.meta) if self.ev_reader else []
        self._splits: dict[float, tuple[np.ndarray, np.ndarray, Any]] = {}
        self._loaders: dict[str, Any] = {}
        self._mixing: dict[str, Any] = {}

    def split(self, holdout: float) -> tuple[np.ndarray, np.ndarray, Any]:
        """(train rows, eval rows, the eval rows as the evaluation reads them) for a holdout (ignored with an
        eval store)."""
        if holdout not in self._splits:
            self._splits[holdout] = self.kind.split(self.reader, holdout, self.ev_reader, self.ev_data)
        return self._splits[holdout]

    def loader(self, rows: np.ndarray, log: Callable[[str], None] | None, **kw: Any):
        """The loader over ``rows`` with these settings: one per distinct setting, shared (and its batch mixing
        reported once)."""
        key = json.dumps({"rows": hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64)).hexdigest(), **kw},
                         sort_keys=True, default=str)
        if key not in self._loaders:
            self._loaders[key] = make_loader(self.reader, rows, data=self.data, allow_code=self.allow_code,
                                             roots=self.roots, **kw)
            self._mixing[key] = report_mixing(self._loaders[key], log)
        return self._loaders[key], self._mixing[key]
