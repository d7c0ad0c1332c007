"""``darkstore eval`` of a finished run, whatever its row kind: its student reloaded and measured on its held-out
rows (or every row of another store). The report's pieces: :mod:`.eval_report` (classes) and :mod:`.lm_eval`
(language models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from darkstore.data import TransferSet
from darkstore.models import ModelSpec, load_model
from storage import open_store
from student_trainer.errors import RunDirError

from .eval_cache import eval_split
from .eval_report import evaluate_student
from .lm_train import evaluate_lm_run
from .recipe import open_checked


def evaluate_run(run: str | Path, *, store: str | Path | None = None, data: TransferSet | None = None,
                 device: str = "cpu", latency: bool = True, write: bool = True, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None, fingerprints=None,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate a finished run (its rows: the eval store, or the same holdout it trained with);
    ``fingerprints``: a :class:`~darkstore.fingerprint.FingerprintPolicy` for checking the transfer set;
    ``cache_dir``: where the teachers' measured cost is kept (:func:`teacher_cost`)."""
    run = Path(run)
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise RunDirError(f"{run} is not a finished run (no summary.json); train it first, or resume it")
    s = json.loads(summary_path.read_text())
    if s.get("modality") == "tokens":  # a language model
        return evaluate_lm_run(run, s, store=store, device=device, write=write, allow_code=allow_code)
    weights = run / "student.safetensors"
    spec = ModelSpec.model_validate(s["student"]).model_copy(update={"weights": str(weights)})
    model = load_model(spec, allow_code=allow_code).module.to(device)
    if store is not None:  # another labeled store: all its rows
        reader = open_store(store)
        rows = reader.finished_rows()
    else:
        train_reader = open_store(s["store"], allow_incomplete=True)
        ev = open_store(s["eval_store"]) if s.get("eval_store") else None
        _, rows = eval_split(train_reader, s.get("holdout") or 0.0, ev)
        reader = ev or train_reader
    data = open_checked(reader, data, allow_code=allow_code, roots=roots, fingerprints=fingerprints)
    report = evaluate_student(model, spec, reader, data, rows, device=device, weights_path=weights,
                              latency=latency, allow_code=allow_code, roots=roots,
                              cache_dir=cache_dir)
    if store is None and len(rows) != s.get("eval_rows", len(rows)):
        report["note"] = (f"the run was evaluated on {s['eval_rows']} rows at training time; the store now gives "
                          f"{len(rows)} (it was incomplete then)")
    if write and store is None:
        (run / "eval.json").write_text(json.dumps(report, indent=2))
    return report
