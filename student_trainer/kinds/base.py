"""The interface every row kind implements on the students' side (see :mod:`student_trainer.kinds`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from darkstore.data import TransferSet
from storage import StoreMeta, StoreReader
from storage.errors import SchemaError

from ..recipe import Recipe


class StudentKind:
    name: str = ""
    #: the recipe a student of this kind trains with
    recipe: type[Recipe] = Recipe
    #: the held-out metrics tables show for this kind, in order
    metrics: tuple[str, ...] = ()
    #: the report's headline: (metric, label, higher is better, shown as a percentage)
    headline: tuple[str, str, bool, bool] = ("", "", True, False)
    #: an epoch's progress line: (held-out metric, its short name, its format)
    epoch_metric: tuple[str, str, str] = ("", "", "")

    def default_temperature(self, meta: StoreMeta) -> float:
        """T where none is given."""
        raise NotImplementedError

    # -- a run's inputs ---------------------------------------------------------------------------------
    def open_data(self, reader: StoreReader, data: TransferSet | None, *, allow_code: bool,
                  roots: Sequence[str | Path] | None, fingerprints: Any) -> TransferSet | None:
        """The rows' inputs where the store does not hold them (its transfer set, checked), else None."""
        return None

    def check_eval_store(self, meta: StoreMeta, ev_reader: StoreReader) -> None:
        """Refuse an eval store whose rows cannot be compared with the training store's."""
        if ev_reader.meta.kind is not meta.kind:
            raise SchemaError(f"the eval store {ev_reader.path} holds {ev_reader.meta.kind.name}; the training store "
                             f"holds {meta.kind.name}")

    def split(self, reader: StoreReader, holdout: float, ev_reader: StoreReader | None,
              ev_data: TransferSet | None) -> tuple[np.ndarray, np.ndarray, Any]:
        """(train rows, eval rows, the eval rows as the evaluation reads them) for a holdout (ignored with an
        eval store)."""
        raise NotImplementedError

    # -- the library API (SoftTargets) -----------------------------------------------------------------
    def loss(self, targets: Any, student_logits: torch.Tensor, batch: Any, *, alpha: float,
             topk_loss: str) -> torch.Tensor:
        """What ``darkstore train --loss kl`` minimises on ``batch``, from the student's logits."""
        raise NotImplementedError

    def teacher_argmax(self, batch: Any, meta: StoreMeta) -> torch.Tensor:
        """The teachers' most likely class (token) for each row (position) of ``batch``."""
        raise NotImplementedError

    # -- a finished run --------------------------------------------------------------------------------
    def evaluate_run(self, run: Path, summary: dict[str, Any], **options: Any) -> dict[str, Any]:
        """``darkstore eval`` of a finished run of this kind."""
        raise NotImplementedError

    def export_run(self, run: Path, fmt: str, out: str | Path | None, allow_code: bool) -> Any:
        """``darkstore export`` of a finished run of this kind."""
        raise NotImplementedError

    def held_out_text(self, final: dict[str, Any]) -> str:
        """A finished run's held-out metrics in one line."""
        raise NotImplementedError

    def vs_teachers(self, run: dict[str, Any]) -> list[dict[str, str]]:
        """The report's table of the student beside its teachers (quality, then sizes and costs)."""
        raise NotImplementedError
