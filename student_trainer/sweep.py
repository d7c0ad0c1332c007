"""Many students from one cache: a grid of training runs, run in parallel, resumable.

A grid file (YAML or JSON)::

    store: store/              # the store the students distill from
    job: job.yaml              # optional: the teacher job that fills it (`darkstore sweep` runs it first)
    base:                      # TrainConfig fields every point shares
      epochs: 60
      student: {arch: mlp, arch_kwargs: {in_features: 64, hidden: [256]}}
    students:                  # optional: named students, for a `student` axis
      mlp64:  {arch: mlp, arch_kwargs: {in_features: 64, hidden: [64]}}
      mlp256: {arch: mlp, arch_kwargs: {in_features: 64, hidden: [256]}}
    grid:                      # axes: any TrainConfig field; every combination is one run
      alpha: [0, 0.5, 1]
      seed: [0, 1, 2, 3]

Each point trains into ``OUT/runs/<axis=value_…>``. Points that differ only in each student's own
settings (:data:`~student_trainer.config.PER_STUDENT`: the student, T, α, the objective, the
optimiser's settings, epochs) see the same batches, so they train together in one process
(``python -m student_trainer.sweep DIR…``): each batch is read and decoded once and every
student takes its step on it, each with its own random stream. Stepped one by one
(``stack=False``, ``--no-stack``) the weights are bit for bit those each point reaches alone;
stacked (the default for points of one architecture) they start within float32 rounding of
them, and the difference grows over training (another order of additions): a sample of the
recipe as good as alone, but not the same one. Points that differ in seed, batch size, holdout or the shuffle window
see other batches and run in other processes, ``parallel`` at a time (``isolate``: one
process per point, as a crash then takes one point down); when one runs at a time, the groups
train one after another in the sweep's own process (torch loaded once). A point whose run directory holds
a ``summary.json`` is finished and is skipped; an interrupted point continues from its
checkpoint. A point identical in effect to an earlier one (it differs only in settings its run does not
use: T when α = 0 or with ``ce``; :func:`~student_trainer.config.unused_settings`) is not trained again:
its run directory is a link to that point's. A lock file per run keeps two sweeps from training the same
point at once. Each
point's lines go to its ``train.log``, each process's output to ``OUT/logs/``. Results:
``OUT/results.csv`` (one row per run, with its training wall seconds and how many students it
was stacked with), ``OUT/results.json`` and ``OUT/results.md`` (mean ±
sample std over seeds for every other combination of axes).
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
from typing import Any, Callable, Sequence, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from darkstore.modelspec import ModelSpec
from darkstore.errors import SpecError
from darkstore.fingerprint import FingerprintPolicy
from storage.location import Location, canonical

from .config import TrainConfig, batch_key, effect_key
from .kinds import ALL_METRICS, STUDENTS, run_kind, store_temperature
from .tracking import check_trackers

def metrics_of(runs: list[dict[str, Any]]) -> tuple[str, ...]:
    """The metrics a sweep's tables show: those of its runs' kind (:mod:`student_trainer.kinds`)."""
    return tuple(dict.fromkeys(m for r in runs for m in STUDENTS[r["kind"]].metrics))
SHORT = {"temperature": "T"}  # run names: axis=value joined by "_"


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store: str | None = Field(None, description="store to distill from (the command line's --store wins)")
    job: str | None = Field(None, description="a job file (teachers and transfer set): `darkstore sweep` first "
                            "fills the store from it in its own process (resumable; nothing to compute when the "
                            "store is complete)")
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
    def from_file(cls, path: str | Path, sets: Sequence[str] = ()) -> "GridSpec":
        """The grid file at ``path``, with ``sets`` (``KEY=VALUE``, dotted keys into the file: ``base.epochs=3``,
        ``grid.seed=[0, 1]``) applied over it."""
        from darkstore.specfile import apply_overrides, load_spec_file

        doc = load_spec_file(path)
        if not isinstance(doc, dict):
            raise SpecError(f"{path}: a grid file is a mapping with base/students/grid")
        doc = apply_overrides(doc, list(sets))
        try:
            spec = cls.model_validate(doc)
        except ValidationError as exc:
            raise SpecError(f"{path}: {exc}") from exc
        base = Path(path).resolve().parent
        upd: dict[str, Any] = {k: _relative_to(base, v) for k in ("store", "eval_store") if (v := getattr(spec, k))}
        if spec.job:
            upd["job"] = str(base / spec.job)
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


def points(spec: GridSpec, temperature: float | None = None) -> list[Point]:
    """Every combination of the grid's axes over its base; ``temperature``: T where neither sets it (the
    store's default, :func:`~student_trainer.kinds.default_temperature`)."""
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
        if temperature is not None:
            cfg.setdefault("temperature", temperature)
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
    state: str  # "finished" (now), "skipped" (was finished), "same" (another point's run), "failed", "busy";
    # while it trains (reported through on_event only): "started", "epoch"
    seconds: float = 0.0
    error: str = ""  # "same": the name of the point whose run this is; "started": its train.log
    epoch: dict[str, Any] | None = None  # "epoch": the metrics row the point just wrote


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


def _units(todo: list[Point], isolate: bool) -> list[list[Point]]:
    """The points each training process takes: points that see the same batches go together (one read of
    each batch feeds them all); ``isolate``: one point per process."""
    if isolate:
        return [[p] for p in todo]
    units: dict[str, list[Point]] = {}
    for p in todo:
        units.setdefault(batch_key(p.config), []).append(p)
    return list(units.values())


def _same_runs(pts: list[Point], runs: Path) -> dict[str, str]:
    """Points identical in effect to an earlier point (they differ only in settings the run does not use, e.g. T
    at α = 0): each becomes a link to that point's run directory instead of a second training of the same run.
    A point that already has a directory of its own (an older sweep trained it) keeps it."""
    first: dict[str, str] = {}
    same: dict[str, str] = {}
    for p in pts:
        key = effect_key(p.config)
        run = runs / p.name
        if key not in first or (run.exists() and not run.is_symlink()):
            first.setdefault(key, p.name)
            continue
        same[p.name] = first[key]
        if not run.is_symlink():
            run.symlink_to(first[key], target_is_directory=True)
    return same


def _unit_name(unit: list[Point]) -> str:
    return unit[0].name + (f"+{len(unit) - 1}" if len(unit) > 1 else "")


def _held_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds this point's lock now."""
    try:
        with (run_dir / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True


def _outcome(p: Point, run_dir: Path, rc: int, seconds: float, log: Path) -> PointOutcome:
    if (run_dir / "summary.json").exists():
        return PointOutcome(p, "finished", seconds)
    if _held_elsewhere(run_dir):
        return PointOutcome(p, "busy", error="another process is training this point")
    tail = [line for line in (run_dir / "train.log").read_text(errors="replace").strip().splitlines()
            if line.startswith("== failed")][-1:] if (run_dir / "train.log").exists() else []
    if not tail:  # the process died without saying: its own log says why
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    return PointOutcome(p, "failed", seconds, " | ".join(tail) or f"exit code {rc}")


class _Watch:
    """Reports points while they train: when each starts (with its train.log) and each epoch it ends (the
    rows its metrics.jsonl gains), so a sweep is never silent for a whole point."""

    def __init__(self, on_event: Callable[[PointOutcome, int, int], None] | None, done: Callable[[], int],
                 total: int):
        self.on_event, self.done, self.total = on_event, done, total
        self.lines: dict[str, int] = {}
        self.sizes: dict[str, int] = {}  # metrics.jsonl's size when last read: unchanged files are not read again

    def start(self, p: Point, run_dir: Path) -> None:
        self.lines[p.name] = self._rows(run_dir)  # a resumed point's earlier epochs are not news
        if self.on_event:
            self.on_event(PointOutcome(p, "started", error=str(run_dir / "train.log")), self.done(), self.total)

    def epochs(self, unit: list[Point], runs: Path, seconds: float) -> None:
        if not self.on_event:
            return
        for p in unit:
            f = runs / p.name / "metrics.jsonl"
            size = f.stat().st_size if f.exists() else 0
            if size == self.sizes.get(p.name):
                continue
            self.sizes[p.name] = size
            text = f.read_text() if size else ""
            rows = text[:text.rfind("\n") + 1].splitlines()  # whole lines only: the trainer may be appending
            for line in rows[self.lines.get(p.name, 0):]:
                if line.strip():
                    self.on_event(PointOutcome(p, "epoch", seconds, epoch=json.loads(line)), self.done(), self.total)
            self.lines[p.name] = max(self.lines.get(p.name, 0), len(rows))

    @staticmethod
    def _rows(run_dir: Path) -> int:
        f = run_dir / "metrics.jsonl"
        return len(f.read_text().splitlines()) if f.exists() else 0


def _write_points(unit: list[Point], runs: Path, common: dict[str, Any], device: str, threads: int) -> list[str]:
    """Each point's ``point.json`` (what its training process reads); the run directories."""
    dirs = []
    for p in unit:
        run_dir = runs / p.name
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = p.config.model_copy(update={"device": device, "threads": p.config.threads or threads})
        (run_dir / "point.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "axes": p.axes,
                                                        **common}, indent=2))
        dirs.append(str(run_dir))
    return dirs


def _in_this_process(dirs: list[str], log_path: Path, after_epoch: Callable[[], None]) -> int:
    """Train one unit in this process, as its own process would (its output to ``log_path``); exit status."""
    import traceback

    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with log_path.open("a", buffering=1) as log:
        try:
            return _run_points([Path(d) for d in dirs], after_epoch=after_epoch, out=log)
        except Exception as e:  # what a child process would die of: this point fails, the sweep goes on
            traceback.print_exc(file=log)
            print(f"failed: {type(e).__name__}: {e}", file=log)
            return 1
        finally:  # the next unit starts as a fresh process would
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)


def _in_processes(units: list[list[Point]], parallel: int, prepare: Callable[[list[Point], int], tuple[list[str], Path]],
                  threads: int, watch: "_Watch", runs: Path, finish: Callable[[list[Point], int, float, Path], None],
                  poll: float) -> None:
    """Train ``units`` in child processes (``python -m student_trainer.sweep DIR…``), ``parallel`` at once."""
    running: dict[int, tuple[subprocess.Popen, list[Point], float, Any, Path]] = {}
    free = list(range(parallel))
    try:
        while units or running:
            while units and free:
                slot, unit = free.pop(0), units.pop(0)
                dirs, log_path = prepare(unit, slot)
                env = dict(os.environ, OMP_NUM_THREADS=str(unit[0].config.threads or threads))  # read at start-up
                log = log_path.open("a")
                proc = subprocess.Popen([sys.executable, "-m", "student_trainer.sweep", *dirs],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
                running[slot] = (proc, unit, time.perf_counter(), log, log_path)
            time.sleep(poll)
            for slot, (proc, unit, t0, log, log_path) in list(running.items()):
                rc = proc.poll()
                watch.epochs(unit, runs, time.perf_counter() - t0)
                if rc is None:
                    continue
                log.close()
                del running[slot]
                free.append(slot)
                finish(unit, rc, t0, log_path)
    finally:
        for proc, *_ in running.values():
            proc.kill()


def run_sweep(spec: GridSpec, out: str | Path, *, store: str | Path | None = None,
              eval_store: str | Path | None = None, parallel: int | None = None, device: str | None = None,
              allow_code: bool = False, on_event: Callable[[PointOutcome, int, int], None] | None = None,
              poll: float = 0.2, threads: int | None = None, isolate: bool = False,
              stack: bool | str = "auto", fingerprints: FingerprintPolicy | None = None,
              track: Sequence[str] = (), cache_dir: Path | None = None) -> SweepResult:
    """Train every point not finished yet, then write the results tables. Points that see the same batches
    (they differ only in :data:`~student_trainer.config.PER_STUDENT` settings) train together in one process
    from one read of the store; ``parallel`` such processes run at once. ``isolate``: one process per point.
    ``stack``: in a process, students of one architecture and optimiser step as one stacked model (True), each
    alone (False), or whichever their first steps show is faster on this model and device (``"auto"``).
    ``threads``: torch threads per process (default: the CPU cores shared out among the processes running at
    once; a point's own ``threads`` in the grid wins). ``fingerprints``: how each process checks the transfer
    set (with a cache, the first process reads it whole and the others wait for its manifest). ``track``: run
    trackers every point logs to (:mod:`student_trainer.tracking`)."""
    out = Path(out).resolve()
    track = check_trackers(track)
    store = store or spec.store
    if store is None:
        raise SpecError("no store: give --store or put store: in the grid file")
    eval_store = eval_store or spec.eval_store
    device = device or spec.base.get("device", "cpu")
    pts = points(spec, store_temperature(store))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({
        "store": canonical(store), "eval_store": canonical(eval_store) if eval_store else None,
        "axes": list(spec.grid), "grid": spec.model_dump(mode="json"), "points": [p.name for p in pts],
    }, indent=2))
    gpus = device == "cuda"

    outcomes: list[PointOutcome] = []
    todo: list[Point] = []
    same = _same_runs(pts, out / "runs")
    for p in pts:
        if p.name in same:
            outcomes.append(PointOutcome(p, "same", error=same[p.name]))
            if on_event:
                on_event(outcomes[-1], len(outcomes), len(pts))
        elif (out / "runs" / p.name / "summary.json").exists():
            outcomes.append(PointOutcome(p, "skipped"))
            if on_event:
                on_event(outcomes[-1], len(outcomes), len(pts))
        else:
            todo.append(p)
    units = _units(todo, isolate)
    parallel = min(parallel or default_parallel(device), max(1, len(units)))
    threads = threads or (max(1, (os.cpu_count() or 1) // parallel) if not device.startswith("cuda") else 1)

    watch = _Watch(on_event, lambda: len(outcomes), len(pts))
    point_file = {"store": canonical(store), "eval_store": canonical(eval_store) if eval_store else None,
                  "allow_code": allow_code, "stack": stack, "track": list(track),
                  "cache_dir": str(cache_dir) if cache_dir else None,
                  "fingerprints": fingerprints.model_dump(mode="json") if fingerprints else None}

    def finish(unit: list[Point], rc: int, t0: float, log_path: Path) -> None:
        for p in unit:
            outcomes.append(_outcome(p, out / "runs" / p.name, rc, time.perf_counter() - t0, log_path))
            if on_event:
                on_event(outcomes[-1], len(outcomes), len(pts))

    def prepare(unit: list[Point], slot: int) -> tuple[list[str], Path]:
        dirs = _write_points(unit, out / "runs", point_file, f"cuda:{slot}" if gpus else device, threads)
        for p in unit:
            watch.start(p, out / "runs" / p.name)
        return dirs, out / "logs" / f"{_unit_name(unit)}.log"

    if parallel == 1 and not isolate:  # one process at a time: this one (no second start-up per unit)
        for unit in units:
            t0 = time.perf_counter()
            dirs, log_path = prepare(unit, 0)
            rc = _in_this_process(dirs, log_path, lambda: watch.epochs(unit, out / "runs", time.perf_counter() - t0))
            watch.epochs(unit, out / "runs", time.perf_counter() - t0)
            finish(unit, rc, t0, log_path)
    else:
        _in_processes(units, parallel, prepare, threads, watch, out / "runs", finish, poll)
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
                         "kind": run_kind(s).name, **{m: s["final"].get(m) for m in ALL_METRICS},
                         "epochs": s["config"]["epochs"],
                         "seconds": s.get("seconds"), "stacked_with": s.get("stacked_with", 0)})
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def group_table(runs: list[dict[str, Any]], axes: list[str], metrics: Sequence[str] | None = None
                ) -> list[dict[str, Any]]:
    """Mean ± sample std of each metric (default: those of the runs' kind) over seeds, for every combination of
    the other axes."""
    metrics = metrics_of(runs) if metrics is None else metrics
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
        for m in metrics:
            row[m + "_mean"], row[m + "_std"] = mean_std([r[m] for r in rs])
        table.append(row)
    return table


#: metrics shown as percentages wherever darkstore prints them (eval, sweep tables, reports); the others as is
PERCENT_METRICS = ("accuracy", "agreement", "ece", "top1")


def format_metric(m: str, mean: float, std: float) -> str:
    """``mean ± std`` of a metric in the one unit every table uses for it."""
    if m in PERCENT_METRICS:
        return f"{100 * mean:.2f} ± {100 * std:.2f} %"
    return f"{mean:.4f} ± {std:.4f}"


def markdown_table(table: list[dict[str, Any]], axes: list[str]) -> str:
    """The grouped table (:func:`group_table`) in Markdown, with the metrics it holds."""
    metrics = [k[:-len("_mean")] for k in table[0] if k.endswith("_mean")] if table else []
    keys = [a for a in axes if a != "seed"]
    head = keys + ["n"] + [f"{m} (mean ± std)" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [str(r[k]) for k in keys] + [str(r["n"])]
        for m in metrics:
            cells.append(format_metric(m, r[m + "_mean"], r[m + "_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, pts: list[Point], axes: list[str]) -> list[dict[str, Any]]:
    runs = load_runs(out, pts)
    table = group_table(runs, axes)
    metrics = metrics_of(runs)
    cols = ["run", *axes, *metrics, "epochs", "seconds", "stacked_with"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    (out / "results.json").write_text(json.dumps({"axes": axes, "runs": runs, "table": table}, indent=2))
    (out / "results.md").write_text(f"{len(runs)} of {len(pts)} runs finished\n\n" + markdown_table(table, axes))
    return table


def _run_points(run_dirs: list[Path], after_epoch: Callable[[], None] | None = None, out: TextIO | None = None) -> int:
    """Train a sweep's points in this process (a sweep's child process, or the sweep itself when it runs one
    process at a time): each point's run directory is locked (one held by another process is left to it),
    points that see the same batches train together, and each point's own lines go to its ``train.log``.
    ``after_epoch``: called when a point has written an epoch's metrics; ``out``: where this process's own
    lines go (standard output). Exit status 0 when every point here finished."""
    out = out or sys.stdout
    mine, locks = [], []
    try:
        for d in run_dirs:
            lock = (d / ".lock").open("a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{d} is being trained by another process", file=out, flush=True)
                lock.close()
                continue
            locks.append(lock)
            mine.append(d)
        return _train_points(mine, after_epoch, out) if mine else 1
    finally:
        for lock in locks:
            lock.close()  # releases the lock


def _train_points(mine: list[Path], after_epoch: Callable[[], None] | None, out: TextIO) -> int:
    from .train import Run, Sources, train_many

    logs: dict[Path, Any] = {}
    points_ = [json.loads((d / "point.json").read_text()) for d in mine]
    runs = [Run(TrainConfig.model_validate(p["config"]), d) for p, d in zip(points_, mine)]

    def say(run, line: str) -> None:
        if run.out not in logs:
            logs[run.out] = (run.out / "train.log").open("a", buffering=1)
        logs[run.out].write(line + "\n")

    def epoch(run, row: dict[str, Any]) -> None:
        say(run, json.dumps(row))
        if after_epoch:
            after_epoch()

    for run in runs:
        say(run, f"== {time.strftime('%Y-%m-%d %H:%M:%S')} training {run.out.name}"
                 + (f" with {len(runs) - 1} other point(s) in this process" if len(runs) > 1 else ""))
    print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} training {len(runs)} point(s): "
          f"{', '.join(d.name for d in mine)}", file=out, flush=True)

    def done(run, res) -> None:
        if isinstance(res, BaseException):
            say(run, f"== failed: {type(res).__name__}: {' '.join(str(res).split())[:500]}")
        else:
            say(run, f"== finished: {res.final}")

    p0 = points_[0]
    fps = FingerprintPolicy.model_validate(p0["fingerprints"]) if p0.get("fingerprints") else None
    try:
        sources = Sources(p0["store"], eval_store=p0["eval_store"], allow_code=p0["allow_code"], fingerprints=fps,
                          cache_dir=Path(p0["cache_dir"]) if p0.get("cache_dir") else None)
        results = train_many(runs, sources, resume=True, stack=p0.get("stack", "auto"), log=say,
                             track=p0.get("track", ()), on_epoch=epoch, on_done=done)
    finally:
        for f in logs.values():
            f.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    for r in failed:
        print(f"failed: {type(r).__name__}: {r}", file=out, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_points([Path(a) for a in sys.argv[1:]]))
