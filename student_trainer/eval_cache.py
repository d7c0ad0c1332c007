"""The rows a student is judged on and the evaluation cache: a fixed, seeded holdout (by sample in a views
store), the eval rows read once and kept across epochs and students, and the student's predictions on them."""

from __future__ import annotations


from typing import Any, Iterator

import numpy as np
import torch

from darkstore.data import TransferSet
from darkstore.models import ModelSpec, logits_of, preprocess
from storage import StoreMeta, StoreReader
from storage.forms import form_of

from .loader import make_loader
from .metrics import evaluate_logits


HOLDOUT_SEED = 20150309  # fixed, so every student of a store is judged on the same held-out rows


def split_rows(n: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    k = int(round(n * holdout))
    return np.sort(perm[k:]), np.sort(perm[:k])


def eval_split(reader: StoreReader, holdout: float, eval_reader: StoreReader | None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): all finished rows and the eval store's clean rows, or a fixed holdout.

    In a views store the holdout is drawn over *samples* (no view of a held-out sample is trained
    on) and evaluation uses their clean view 0 (all their views when the recipe has no clean view)."""
    rows = reader.finished_rows()
    if eval_reader is not None:
        ev = eval_reader.finished_rows()
        return rows, clean_rows(eval_reader, ev)
    layout = reader.meta.layout
    if layout.k == 1:
        tr, ev = split_rows(len(rows), holdout)
        return rows[tr], rows[ev]
    samples = np.unique(layout.position(rows))
    _, held = split_rows(len(samples), holdout)
    held_rows = np.isin(layout.position(rows), samples[held])
    return rows[~held_rows], clean_rows(reader, rows[held_rows])


def clean_rows(reader: StoreReader, rows: np.ndarray) -> np.ndarray:
    v = reader.meta.views
    if not v or not v.clean_view0:
        return rows
    return rows[reader.meta.layout.view(rows) == 0]


EVAL_CACHE_MB = 1024.0  # eval inputs kept in memory across epochs and students, when they fit


class KeptRows:
    """The rows a run is judged on, read once and kept in memory (up to ``limit_mb``) so that every epoch and
    every student trained together reuses them; read again each time when they do not fit. A row kind says
    what a batch of them is (:meth:`_read`) and its size (:meth:`_nbytes`)."""

    limit_mb = EVAL_CACHE_MB

    def __init__(self, reader: StoreReader, rows: np.ndarray):
        self.reader, self.rows = reader, rows
        self._kept: list[Any] | None = None
        self._fits: bool | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self) -> Iterator[Any]:
        raise NotImplementedError

    def _nbytes(self, item: Any) -> int:
        raise NotImplementedError

    def batches(self) -> Iterator[Any]:
        if self._kept is not None:
            return iter(self._kept)
        if self._fits is False:
            return self._read()
        kept, size = [], 0
        for item in self._read():
            size += self._nbytes(item)
            if size > self.limit_mb * (1 << 20):
                self._fits = False
                return self._read()
            kept.append(item)
        self._kept, self._fits = kept, True
        return iter(kept)


class EvalRows(KeptRows):
    """Rows of classes: inputs, the teachers' distribution and labels per batch."""

    def __init__(self, reader: StoreReader, data: TransferSet, rows: np.ndarray, batch_size: int = 1024):
        super().__init__(reader, rows)
        self.data, self.batch_size = data, batch_size

    def _read(self):
        for b in make_loader(self.reader, self.rows, batch_size=self.batch_size, shuffle=False,
                             data=self.data).epoch(0):
            yield b.x, teacher_view(b, self.reader.meta), b.labels

    def _nbytes(self, item) -> int:
        return sum(t.nbytes for t in item)


@torch.no_grad()
def predict(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader | EvalRows, data: TransferSet | None = None,
            rows: np.ndarray | None = None, device: str = "cpu",
            batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, stored teacher logits and labels over ``rows`` of the store, or over an
    :class:`EvalRows` (float32, on the CPU)."""
    ev = reader if isinstance(reader, EvalRows) else EvalRows(reader, data, rows, batch_size)
    was = model.training
    model.eval()
    s, t, y = [], [], []
    for x, tv, yb in ev.batches():
        s.append(logits_of(model(preprocess(x.to(device), spec.preprocess))).float().cpu())
        t.append(tv)
        y.append(yb)
    model.train(was)
    if not s:
        c = ev.reader.meta.num_classes
        return torch.empty(0, c), torch.empty(0, c), torch.empty(0, dtype=torch.int64)
    return torch.cat(s), torch.cat(t), torch.cat(y)


def teacher_view(b, meta: StoreMeta) -> torch.Tensor:
    """[B, C] the teachers' log-probabilities at T = 1 for metrics, as far as the store's form tells
    (:meth:`storage.forms.Form.teacher_logp`)."""
    return form_of(meta).teacher_logp(b.stored(), meta)


def evaluate(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader | EvalRows, data: TransferSet | None = None,
             rows: np.ndarray | None = None, device: str = "cpu", batch_size: int = 1024) -> dict[str, float]:
    """Accuracy, agreement with the teachers, NLL and ECE of ``model`` on ``rows`` of the store (or an
    :class:`EvalRows`)."""
    if len(reader if isinstance(reader, EvalRows) else rows) == 0:
        return {}
    return evaluate_logits(*predict(model, spec, reader, data, rows, device, batch_size))
