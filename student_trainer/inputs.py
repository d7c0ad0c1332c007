"""What every student of one store shares (:class:`Inputs`), opened once per process through the store's row
kind (:mod:`student_trainer.kinds`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from darkstore.fingerprint import FingerprintPolicy
from storage import StoreReader, open_store

from .kinds import student_kind
from .loader import make_loader
from .recipe import eval_store_warnings, report_mixing


class Inputs:
    """What every student of one store shares, opened once per process: the store, its transfer set (checked
    once), the eval store, the row splits, the eval rows (read once), and one loader per distinct batch order
    (students whose batches are the same share one: each batch is read and decoded once for all of them)."""

    def __init__(self, store, data, eval_store, eval_data, *, allow_incomplete: bool, allow_code: bool,
                 roots: Sequence[str | Path] | None, fingerprints: FingerprintPolicy | None = None,
                 cache_dir: Path | None = None):
        self.allow_code, self.roots = allow_code, roots
        self.cache_dir = cache_dir  # where the teachers' measured cost is kept (evaluate.teacher_cost)
        self.reader = store if isinstance(store, StoreReader) else open_store(store, allow_incomplete=allow_incomplete)
        self.meta = self.reader.meta
        self.kind = student_kind(self.meta)
        opened = dict(allow_code=allow_code, roots=roots, fingerprints=fingerprints)
        self.data = self.kind.open_data(self.reader, data, **opened)  # None: the rows' inputs are in the store
        self.ev_reader: StoreReader | None = None
        self.ev_data = self.data
        if eval_store is not None:
            self.ev_reader = eval_store if isinstance(eval_store, StoreReader) else open_store(eval_store)
            self.kind.check_eval_store(self.meta, self.ev_reader)
            self.ev_data = self.kind.open_data(self.ev_reader, eval_data, **opened)
        self.has_eval_store = eval_store is not None
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
