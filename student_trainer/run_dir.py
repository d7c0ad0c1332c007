"""A run folder: what it holds, how it is written, and when it is finished.

``config.json`` is written first; ``checkpoint.pt`` while training (atomic, at every epoch end and every
``checkpoint_every`` steps); ``metrics.jsonl``; ``student.safetensors``; ``eval.json``; and last
``summary.json``: a run is finished exactly when its summary exists. A folder that holds a run is continued
(``resume``) or replaced on request (``overwrite``), never by default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from student_trainer.errors import RunDirError

from .config import TrainConfig


CHECKPOINT_VERSION = 1


#: config fields that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {"device", "checkpoint_every"}


@dataclass
class RunResult:
    out: Path
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    retemper: str = ""
    num_params: int = 0
    resumed_from: str | None = None  # "epoch E step S" when continued from a checkpoint
    already_finished: bool = False


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Settings that differ; a setting one side lacks counts as its default (a run written before it existed)."""
    defaults = {k: f.default for k, f in TrainConfig.model_fields.items() if not f.is_required()}
    return sorted(k for k in set(a) | set(b)
                  if k not in RESUMABLE_CHANGES and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


#: what a run folder holds that training must never delete unasked
RUN_FILES = ("summary.json", "student.safetensors", "eval.json", "checkpoint.pt")


def refuse_to_replace(out: Path) -> None:
    """A folder holding a run is continued (``resume``) or replaced on request (``overwrite``), never by default."""
    held = [f for f in RUN_FILES if (out / f).exists()]
    if not held:
        return
    what = "a finished run" if "summary.json" in held else (
        "an interrupted run (checkpoint.pt)" if "checkpoint.pt" in held else f"a run ({', '.join(held)})")
    raise RunDirError(f"{out} holds {what}; nothing was changed. --resume continues it (a finished run is "
                      "left as is), --overwrite deletes it and starts over, or choose another --out")


def finished_run(config: TrainConfig, out: Path) -> RunResult | None:
    """The result of a finished run in ``out`` with this config (None when it is not finished)."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return None
    s = json.loads(summary_path.read_text())
    diff = config_diff(s.get("config", {}), config.model_dump(mode="json"))
    if diff:
        raise RunDirError(f"{out} holds a finished run with another config (differs in {', '.join(diff)})")
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return RunResult(out, s.get("final", {}), hist, s.get("retemper", {}).get("description", ""),
                     s.get("num_params", 0), already_finished=True)
