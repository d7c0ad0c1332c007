"""Run tracking: the numbers ``metrics.jsonl`` holds, also sent where users compare runs.

``metrics.jsonl`` and ``summary.json`` stay the record; a tracker mirrors them. Chosen per run by name
(``darkstore train --track tensorboard``, a sweep's ``--track``): ``tensorboard`` writes event files to
``RUN/tensorboard`` (``tensorboard --logdir SWEEP/runs`` compares a sweep's points), one scalar per
numeric field of each epoch's row (``train/loss``, ``train/lr``, ``eval/accuracy`` …) at the row's step,
and the run's settings with its final metrics as hyper-parameters.

A resumed run rewrites its tracker's view from the checkpoint's history: events the interrupted process
wrote are hidden (TensorBoard's ``purge_step``) and the history is logged again, so an epoch logged after
the last checkpoint, or lost between the checkpoint and the log, appears exactly once.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol, Sequence

from darkstore.errors import SpecError

TRACKERS = ("tensorboard",)


class Tracker(Protocol):
    def epoch(self, row: dict[str, Any]) -> None: ...

    def finish(self, config: dict[str, Any], final: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: Sequence[str]) -> list[str]:
    """The tracker names, checked (before anything trains)."""
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise SpecError(f"unknown tracker {bad[0]!r}; choose from: {', '.join(TRACKERS)}")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise SpecError("--track tensorboard needs tensorboard: pip install 'darkstore[tensorboard]'")
    return list(dict.fromkeys(names))


def open_trackers(names: Sequence[str], out: Path, history: list[dict[str, Any]]) -> list[Tracker]:
    """Trackers for the run in ``out``, each already holding ``history`` (the rows a resumed run has)."""
    trackers: list[Tracker] = [TensorBoardTracker(out / "tensorboard") for n in names if n == "tensorboard"]
    for t in trackers:
        for row in history:
            t.epoch(row)
    return trackers


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k in ("epoch", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        tag = f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"train/{k.removeprefix('train_')}"
        out[tag] = float(v)
    return out


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=0: whatever an interrupted process of this run wrote is hidden; the history is logged again
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=0)

    def epoch(self, row: dict[str, Any]) -> None:
        for tag, value in _scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["step"]))
        self.writer.add_scalar("train/epoch", float(row["epoch"]), global_step=int(row["step"]))
        self.writer.flush()

    def finish(self, config: dict[str, Any], final: dict[str, Any]) -> None:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v, sort_keys=True))
                   for k, v in config.items() if v is not None}
        metrics = {f"final/{k}": float(v) for k, v in final.items() if isinstance(v, (int, float))}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["TRACKERS", "TensorBoardTracker", "Tracker", "check_trackers", "open_trackers"]
