"""The report of a trained student: quality on held-out rows and what it costs against its teachers.

``eval.json`` of a run (written at the end of training, and by ``darkstore eval RUN``):

* ``metrics`` — accuracy, NLL, ECE on labeled rows; top-1 agreement with the teacher ensemble
  (its stored targets) on all rows; the same numbers for the ensemble's stored targets;
* ``reliability`` — the reliability diagram's bins (15 equal-width confidence bins) and ECE;
* ``confusion`` — counts [true class][predicted class];
* ``compression`` — parameters, bytes on disk and CPU latency (batch 1) and throughput
  (batch 256) of the student and of the teacher ensemble (members run one after another,
  as the generation did), and the ratios.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from darkstore.data import TransferSet
from darkstore.models import ModelSpec, count_params, load_model, logits_of, preprocess
from storage import StoreReader
from storage.location import canonical

from .eval_cache import predict
from .metrics import confusion, evaluate_logits, reliability

LATENCY_BATCH = 256


def cpu_latency(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, *, min_seconds: float = 0.25,
                max_calls: int = 200, slow: float = 0.5) -> float:
    """Median seconds per call of ``fn(x)`` after a warm-up call (inference mode, current CPU
    threads): at least 3 calls and ``min_seconds``; a call slower than ``slow`` seconds is timed once."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(x)
        if time.perf_counter() - t0 > 2 * slow:
            t0 = time.perf_counter()
            fn(x)
            return time.perf_counter() - t0
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_calls):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
            if times[-1] > slow:
                break
    return statistics.median(times)


def _cost(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> dict[str, float]:
    one = cpu_latency(fn, x[:1])
    many = cpu_latency(fn, x[:LATENCY_BATCH])
    return {"latency_ms_batch1": one * 1e3, "throughput_per_s": len(x[:LATENCY_BATCH]) / many,
            "latency_batch_rows": int(len(x[:LATENCY_BATCH]))}


def _sample_inputs(data: TransferSet) -> torch.Tensor:
    x, _ = data.get_batch(np.arange(min(len(data), LATENCY_BATCH)))
    return x.float()


def teacher_cost(reader: StoreReader, x: torch.Tensor, *, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Parameters, bytes on disk and CPU cost of the store's teacher ensemble (as recorded).

    With ``cache_dir`` (the CLI passes its cache, ``$DARKSTORE_CACHE`` or ``~/.cache/darkstore``), measured once
    per (store job, CPU threads) and kept there: every student of a sweep is compared with the same teachers,
    which may take far longer to time than the students. Without one, measured every time."""
    if cache_dir is None:
        return _teacher_cost(reader, x, allow_code=allow_code, roots=roots)
    key = f"teacher-cost-{reader.meta.job_key[:32]}-t{torch.get_num_threads()}-{tuple(x.shape)}.json".replace(" ", "")
    cached = Path(cache_dir) / key
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except ValueError:
            pass
    out = _teacher_cost(reader, x, allow_code=allow_code, roots=roots)
    if "latency_error" not in out:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.name + f".{os.getpid()}")
            tmp.write_text(json.dumps(out))
            os.replace(tmp, cached)
        except OSError:  # a read-only home: measure again next time
            pass
    return out


def teacher_size(reader: StoreReader) -> dict[str, Any]:
    """The recorded ensemble's members, parameters and bytes on disk (None when a weight file is gone)."""
    meta = reader.meta
    sizes = [Path(t.weights).stat().st_size if t.weights and Path(t.weights).is_file() else None
             for t in meta.teachers]
    return {"members": len(meta.teachers), "params": sum(t.num_params for t in meta.teachers),
            "size_bytes": sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None}


def _teacher_cost(reader: StoreReader, x: torch.Tensor, *, allow_code: bool = False,
                  roots: Sequence[str | Path] | None = None) -> dict[str, Any]:
    meta = reader.meta
    out = teacher_size(reader)
    try:
        members = []
        for t in meta.teachers:
            spec = ModelSpec.model_validate(t.spec)
            if t.weights:
                spec = spec.model_copy(update={"weights": t.weights})
            lm = load_model(spec, num_classes=meta.num_classes, allow_code=allow_code, roots=roots)
            if lm.sha256 != t.sha256:
                out["note"] = f"weights of {t.name} changed since the store was generated"
            try:
                lm.module.eval()
            except NotImplementedError:
                pass
            members.append(lm)
        out.update(_cost(lambda b: [m.forward(b) for m in members], x))
    except Exception as exc:  # weights moved, code not allowed, …: report the cost as unknown, say why
        out["latency_error"] = f"{type(exc).__name__}: {exc}"
    return out


def evaluate_student(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader, data: TransferSet,
                     rows: np.ndarray, *, device: str = "cpu", weights_path: Path | None = None,
                     latency: bool = True, allow_code: bool = False,
                     roots: Sequence[str | Path] | None = None, eval_rows: Any = None,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """``eval_rows``: the same rows already read (a :class:`~student_trainer.eval_cache.EvalRows`), to reuse;
    ``cache_dir``: where the teachers' measured cost is kept (:func:`teacher_cost`)."""
    s, t, y = predict(model, spec, eval_rows if eval_rows is not None else reader, data, rows, device)
    c = reader.meta.num_classes
    report: dict[str, Any] = {
        "store": canonical(reader.location), "rows": int(len(rows)),
        "metrics": evaluate_logits(s, t, y) if len(rows) else {},
        "teacher_metrics": evaluate_logits(t, t, y) if len(rows) else {},
        "reliability": reliability(s, y) if bool((y >= 0).any()) else None,
        "teacher_reliability": reliability(t, y) if bool((y >= 0).any()) else None,
        "confusion": confusion(s, y, c) if bool((y >= 0).any()) else None,
        "class_names": reader.meta.class_names,
    }
    for k in ("agreement", "teacher_accuracy"):  # the teachers against themselves: not metrics
        report["teacher_metrics"].pop(k, None)
    comp: dict[str, Any] = {"student": {"params": count_params(model),
                                        "size_bytes": weights_path.stat().st_size if weights_path else None}}
    if latency:
        x = _sample_inputs(data)
        cpu_model = copy.deepcopy(model).cpu().eval()
        comp["student"].update(_cost(lambda b: logits_of(cpu_model(preprocess(b, spec.preprocess))), x))
        comp["teachers"] = teacher_cost(reader, x, allow_code=allow_code, roots=roots, cache_dir=cache_dir)
        comp["threads"] = torch.get_num_threads()
    else:
        comp["teachers"] = teacher_size(reader)
    st, te = comp["student"], comp["teachers"]
    ratios = {"params": te["params"] / max(1, st["params"])}
    if te.get("size_bytes") and st.get("size_bytes"):
        ratios["size"] = te["size_bytes"] / st["size_bytes"]
    if te.get("latency_ms_batch1") and st.get("latency_ms_batch1"):
        ratios["latency_batch1"] = te["latency_ms_batch1"] / st["latency_ms_batch1"]
        ratios["throughput"] = st["throughput_per_s"] / te["throughput_per_s"]
    comp["teachers_over_student"] = ratios
    report["compression"] = comp
    return report


