"""Many students from one cache: a grid of training runs, run in parallel, resumable.

A grid file (YAML or JSON)::

    base:                      # TrainConfig fields every point shares
      epochs: 60
      student: {arch: mlp, arch_kwargs: {in_features: 64, hidden: [256]}}
    students:                  # optional: named students, for a `student` axis
      mlp64:  {arch: mlp, arch_kwargs: {in_features: 64, hidden: [64]}}
      mlp256: {arch: mlp, arch_kwargs: {in_features: 64, hidden: [256]}}
    grid:                      # axes: any TrainConfig field; every combination is one run
      alpha: [0, 0.5, 1]
      seed: [0, 1, 2, 3]

Each point trains into ``OUT/runs/<axis=value_…>`` in its own process (``python -m
student_trainer.sweep`` — a crash or a kill takes one point down, not the sweep). A point
whose run directory holds a ``summary.json`` is finished and is skipped; an interrupted
point continues from its checkpoint. A lock file per run keeps two sweeps from training the
same point at once. Results: ``OUT/results.csv`` (one row per run), ``OUT/results.json``
and ``OUT/results.md`` (mean ± sample std over seeds for every other combination of axes).
"""

from __future__ import annotations

import csv
import fcntl
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from darkstore.models import ModelSpec
from darkstore.errors import SpecError
from storage.location import Location, canonical

from .train import TrainConfig

METRICS = ("accuracy", "agreement", "nll", "ece")
SHORT = {"temperature": "T"}  # run names: axis=value joined by "_"


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store: str | None = Field(None, description="store to distill from (the command line's --store wins)")
    eval_store: str | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    students: dict[str, ModelSpec] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "GridSpec":
        fields = set(TrainConfig.model_fields)
        for k, values in self.grid.items():
            if k not in fields:
                raise ValueError(f"grid axis {k!r} is not a training option; axes can be: {', '.join(sorted(fields))}")
            if not values:
                raise ValueError(f"grid axis {k!r} has no values")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"grid axis {k!r} repeats a value")
            if k == "student":
                for v in values:
                    if not isinstance(v, str) or v not in self.students:
                        raise ValueError(f"student {v!r} is not one of the named students ({', '.join(self.students) or 'none'})")
        bad = set(self.base) - fields
        if bad:
            raise ValueError(f"base has unknown training options: {', '.join(sorted(bad))}")
        if "student" not in self.grid and "student" not in self.base:
            if len(self.students) != 1:
                raise ValueError("name the student: base.student, one entry under students, or a student axis")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "GridSpec":
        from darkstore.specfile import load_spec_file

        doc = load_spec_file(path)
        if not isinstance(doc, dict):
            raise SpecError(f"{path}: a grid file is a mapping with base/students/grid")
        try:
            spec = cls.model_validate(doc)
        except ValidationError as exc:
            raise SpecError(f"{path}: {exc}") from exc
        base = Path(path).resolve().parent
        upd = {k: _relative_to(base, v) for k in ("store", "eval_store") if (v := getattr(spec, k))}
        return spec.model_copy(update=upd)


def _relative_to(base: Path, where: str) -> str:
    """A grid file's local store paths are relative to the file; URLs stay as they are."""
    loc = Location.parse(where)
    return canonical(base / loc.path) if loc.local is not None else str(loc)


@dataclass
class Point:
    name: str
    axes: dict[str, Any]
    config: TrainConfig


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(v))


def points(spec: GridSpec) -> list[Point]:
    keys = list(spec.grid)
    out = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]:
        axes = dict(zip(keys, combo))
        cfg = dict(spec.base)
        cfg.update(axes)
        if "student" in axes:
            cfg["student"] = spec.students[axes["student"]]
        elif "student" not in cfg:
            cfg["student"] = next(iter(spec.students.values()))
        try:
            config = TrainConfig.model_validate(cfg)
        except ValidationError as exc:
            raise SpecError(f"grid point {axes}: {exc}") from exc
        name = "_".join(f"{SHORT.get(k, k)}={_fmt(v)}" for k, v in axes.items()) or "run"
        out.append(Point(name, axes, config))
    return out


@dataclass
class PointOutcome:
    point: Point
    state: str  # "finished" (now), "skipped" (was finished), "failed", "busy" (another sweep holds it)
    seconds: float = 0.0
    error: str = ""


@dataclass
class SweepResult:
    out: Path
    outcomes: list[PointOutcome]
    table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[PointOutcome]:
        return [o for o in self.outcomes if o.state in ("failed", "busy")]


def _die_with_parent() -> None:  # Linux: a killed sweep takes its training processes with it
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def default_parallel(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, os.cpu_count() or 1)


def run_sweep(spec: GridSpec, out: str | Path, *, store: str | Path | None = None,
              eval_store: str | Path | None = None, parallel: int | None = None, device: str | None = None,
              allow_code: bool = False, on_event: Callable[[PointOutcome, int, int], None] | None = None,
              poll: float = 0.2, threads: int | None = None) -> SweepResult:
    """Train every point not finished yet, ``parallel`` at a time; then write the results tables.
    ``threads``: torch threads per point (default: the CPU cores shared out among the parallel points;
    a point's own ``threads`` in the grid wins)."""
    out = Path(out).resolve()
    store = store or spec.store
    if store is None:
        raise SpecError("no store: give --store or put store: in the grid file")
    eval_store = eval_store or spec.eval_store
    device = device or spec.base.get("device", "cpu")
    pts = points(spec)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({
        "store": canonical(store), "eval_store": canonical(eval_store) if eval_store else None,
        "axes": list(spec.grid), "grid": spec.model_dump(mode="json"), "points": [p.name for p in pts],
    }, indent=2))
    parallel = parallel or default_parallel(device)
    gpus = device == "cuda"
    threads = threads or (max(1, (os.cpu_count() or 1) // parallel) if not device.startswith("cuda") else 1)

    outcomes: list[PointOutcome] = []
    todo: list[Point] = []
    for p in pts:
        if (out / "runs" / p.name / "summary.json").exists():
            outcomes.append(PointOutcome(p, "skipped"))
            if on_event:
                on_event(outcomes[-1], len(outcomes), len(pts))
        else:
            todo.append(p)

    running: dict[int, tuple[subprocess.Popen, Point, float, Any]] = {}
    free = list(range(parallel))
    try:
        while todo or running:
            while todo and free:
                slot, p = free.pop(0), todo.pop(0)
                run_dir = out / "runs" / p.name
                run_dir.mkdir(parents=True, exist_ok=True)
                cfg = p.config.model_copy(update={"device": f"cuda:{slot}" if gpus else device,
                                                  "threads": p.config.threads or threads})
                (run_dir / "point.json").write_text(json.dumps({
                    "config": cfg.model_dump(mode="json"), "axes": p.axes, "store": canonical(store),
                    "eval_store": canonical(eval_store) if eval_store else None, "allow_code": allow_code,
                }, indent=2))
                env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads))  # OpenMP reads it at start-up
                log = (run_dir / "train.log").open("a")
                proc = subprocess.Popen([sys.executable, "-m", "student_trainer.sweep", str(run_dir)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
                running[slot] = (proc, p, time.perf_counter(), log)
            time.sleep(poll)
            for slot, (proc, p, t0, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[slot]
                free.append(slot)
                run_dir = out / "runs" / p.name
                if rc == 0 and (run_dir / "summary.json").exists():
                    o = PointOutcome(p, "finished", time.perf_counter() - t0)
                elif rc == BUSY:
                    o = PointOutcome(p, "busy", error="another process is training this point")
                else:
                    tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
                    o = PointOutcome(p, "failed", time.perf_counter() - t0, " | ".join(tail) or f"exit code {rc}")
                outcomes.append(o)
                if on_event:
                    on_event(o, len(outcomes), len(pts))
    finally:
        for proc, *_ in running.values():
            proc.kill()
    result = SweepResult(out, sorted(outcomes, key=lambda o: pts.index(o.point)))
    result.table = write_results(out, pts, list(spec.grid))
    return result


def load_runs(out: Path, pts: list[Point]) -> list[dict[str, Any]]:
    rows = []
    for p in pts:
        f = out / "runs" / p.name / "summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            rows.append({"run": p.name, **{k: v for k, v in p.axes.items()},
                         **{m: s["final"].get(m) for m in METRICS}, "epochs": s["config"]["epochs"]})
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def group_table(runs: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Mean ± sample std of each metric over seeds, for every combination of the other axes."""
    keys = [a for a in axes if a != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(json.dumps(r.get(k), sort_keys=True) for k in keys), []).append(r)
    def order(k: tuple) -> tuple:
        return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in map(json.loads, k))

    table = []
    for _, rs in sorted(groups.items(), key=lambda kv: order(kv[0])):
        row: dict[str, Any] = {k: rs[0].get(k) for k in keys}
        row["n"] = len(rs)
        for m in METRICS:
            row[m + "_mean"], row[m + "_std"] = mean_std([r[m] for r in rs])
        table.append(row)
    return table


def markdown_table(table: list[dict[str, Any]], axes: list[str]) -> str:
    keys = [a for a in axes if a != "seed"]
    head = keys + ["n"] + [f"{m} (mean ± std)" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [str(r[k]) for k in keys] + [str(r["n"])]
        for m in METRICS:
            mu, sd = r[m + "_mean"], r[m + "_std"]
            pct = m in ("accuracy", "agreement")
            cells.append(f"{100 * mu:.2f} ± {100 * sd:.2f} %" if pct else f"{mu:.4f} ± {sd:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, pts: list[Point], axes: list[str]) -> list[dict[str, Any]]:
    runs = load_runs(out, pts)
    table = group_table(runs, axes)
    cols = ["run", *axes, *METRICS, "epochs"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    (out / "results.json").write_text(json.dumps({"axes": axes, "runs": runs, "table": table}, indent=2))
    (out / "results.md").write_text(f"{len(runs)} of {len(pts)} runs finished\n\n" + markdown_table(table, axes))
    return table


BUSY = 75  # exit status of a point another process holds


def _run_point(run_dir: Path) -> int:
    """Train one point (the child process of a sweep)."""
    from .train import train

    lock = (run_dir / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{run_dir} is being trained by another process", flush=True)
        return BUSY
    p = json.loads((run_dir / "point.json").read_text())
    cfg = TrainConfig.model_validate(p["config"])
    print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} training {run_dir.name}", flush=True)
    r = train(cfg, p["store"], run_dir, eval_store=p["eval_store"], allow_code=p["allow_code"], resume=True,
              log=lambda m: print(m, flush=True),
              on_epoch=lambda row: print(json.dumps(row), flush=True))
    print(f"== finished: {r.final}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_run_point(Path(sys.argv[1])))
