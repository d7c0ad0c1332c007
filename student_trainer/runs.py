"""A finished run of any kind: ``darkstore eval`` and ``darkstore export``, through the run's kind
(:mod:`student_trainer.kinds`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from darkstore.data import TransferSet

from .kinds import finished_summary, run_kind


def evaluate_run(run: str | Path, *, store: str | Path | None = None, data: TransferSet | None = None,
                 device: str = "cpu", latency: bool = True, write: bool = True, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None, fingerprints=None,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate a finished run (its rows: the eval store, or the same holdout it trained with; or every row of
    ``store``); ``fingerprints``: a :class:`~darkstore.fingerprint.FingerprintPolicy` for checking a transfer
    set; ``cache_dir``: where the teachers' measured cost is kept (:func:`~student_trainer.eval_report.teacher_cost`).
    Writes ``eval.json`` unless ``write`` is off or another store is given."""
    run = Path(run)
    summary = finished_summary(run)
    return run_kind(summary).evaluate_run(run, summary, store=store, data=data, device=device, latency=latency,
                                          write=write, allow_code=allow_code, roots=roots,
                                          fingerprints=fingerprints, cache_dir=cache_dir)


def export_run(run: str | Path, fmt: str, out: str | Path | None = None, allow_code: bool = False):
    """Export a finished run's student as ``fmt`` (its kind's formats), reload the file and compare it with the
    student on the run's own inputs. ``allow_code`` as for training."""
    run = Path(run)
    return run_kind(finished_summary(run)).export_run(run, fmt, out, allow_code)
