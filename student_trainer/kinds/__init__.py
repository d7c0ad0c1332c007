"""Row kinds on the students' side: one module per kind, registered under the storage kind's name
(:mod:`storage.kinds`), each owning what a student of that kind is: its recipe (a class student's
:class:`~student_trainer.recipe.Recipe`, a language model's :class:`~student_trainer.lm_train.LMRecipe`), its
inputs and splits, its default temperature, its loss and teacher top-1 in the library API, ``darkstore eval``
and ``export`` of its finished runs, and the metrics tables and reports show.

A run's ``summary.json`` names its kind (``kind``); :func:`run_kind` finds it, and :func:`student_kind` a
store's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from darkstore.errors import DarkstoreError
from storage import StoreMeta, open_store
from storage.kinds import KINDS, Classes, Tokens
from student_trainer.errors import RunDirError

from .base import StudentKind
from .classes import ClassStudents
from .tokens import TokenStudents

#: every kind's students, by the storage kind's name
STUDENTS: dict[str, StudentKind] = {k.name: k for k in (ClassStudents(), TokenStudents())}
assert STUDENTS.keys() == KINDS.keys(), "every row kind needs its students' side"


def student_kind(meta: StoreMeta) -> StudentKind:
    """The students of a store of ``meta``'s kind."""
    return STUDENTS[meta.kind.name]


def run_kind(summary: dict[str, Any]) -> StudentKind:
    """The kind of a run from its ``summary.json`` (runs written before summaries named their kind: a language
    model's gave it as its modality, a class student's nothing)."""
    name = summary.get("kind") or (Tokens.name if summary.get("modality") == "tokens" else Classes.name)
    return STUDENTS[name]


def default_temperature(meta: StoreMeta) -> float:
    """T where none is given: the kind's (4 for classes; 1 for a language model's store, or the T a sampled
    store was drawn at)."""
    return student_kind(meta).default_temperature(meta)


def store_temperature(store) -> float | None:
    """:func:`default_temperature` of the store at ``store`` (None where it cannot be opened yet: training
    then says why)."""
    try:
        return default_temperature(open_store(store, allow_incomplete=True).meta)
    except DarkstoreError:
        return None


def finished_summary(run: Path) -> dict[str, Any]:
    """A finished run's ``summary.json``."""
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise RunDirError(f"{run} is not a finished run (no summary.json); train it first, or resume it")
    return json.loads(path.read_text())


def epoch_text(row: dict[str, Any]) -> str:
    """An epoch's metrics row in words: its training loss and the held-out metric it reports (its kind's)."""
    text = f"loss {row['train_loss']:.4f}"
    for kind in STUDENTS.values():
        metric, short, fmt = kind.epoch_metric
        if row.get(f"eval_{metric}") is not None:
            return f"{text} {short} {row[f'eval_{metric}']:{fmt}}"
    return text


#: every metric a kind shows, for tables that hold runs of any kind
ALL_METRICS = tuple(dict.fromkeys(m for k in STUDENTS.values() for m in k.metrics))

__all__ = ["ALL_METRICS", "STUDENTS", "StudentKind", "default_temperature", "epoch_text", "finished_summary", "run_kind",
           "store_temperature", "student_kind"]
