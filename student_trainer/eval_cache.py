"""The rows a student is judged on and the evaluation cache: a fixed, seeded holdout (by sample in a views
store), the eval rows read once and kept across epochs and students, and the student's predictions on them."""

from __future__ import annotations


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


class EvalRows:
    """The rows a run is judged on, read once: inputs, the teachers' distribution and labels per batch. Kept in
    memory (up to ``EVAL_CACHE_MB``) so that every epoch and every student trained together reuses them; read
    again each time when they do not fit."""

    def __init__(self, reader: StoreReader, data: TransferSet, rows: np.ndarray, batch_size: int = 1024):
        self.reader, self.data, self.rows, self.batch_size = reader, data, rows, batch_size
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._fits: bool | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self):
        for b in make_loader(self.reader, self.rows, batch_size=self.batch_size, shuffle=False,
                             data=self.data).epoch(0):
            yield b.x, teacher_view(b, self.reader.meta), b.labels

    def batches(self):
        if self._kept is not None:
            return iter(self._kept)
        if self._fits is False:
            return self._read()
        kept, size = [], 0
        for x, t, y in self._read():
            size += x.nbytes + t.nbytes + y.nbytes
            if size > EVAL_CACHE_MB * (1 << 20):
                self._fits = False
                return self._read()
            kept.append((x, t, y))
        self._kept, self._fits = kept, True
        return iter(kept)


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
