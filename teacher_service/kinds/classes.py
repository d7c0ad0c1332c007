"""Teachers over rows of classes: an ensemble of classifiers over arrays, images or datasets (and their recorded
views), its combined logits per row, written chunk by chunk with writer threads or processes."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from darkstore.data import TransferSet
from darkstore.errors import ClassCountMismatchError, DarkstoreError, DataError
from darkstore.views import ViewInputs, ViewSet, views_record
from storage import FLOAT16_FLOOR, StoreWriter
from storage.errors import NonFiniteLogitsError
from storage.forms import form_of
from storage.kinds import Classes
from storage.schema import RowLayout
from storage.writer import write_chunk_at

from ..combine import combine
from ..features import FeatureTaps
from ..prepared import (
    Cancelled, PreparedJob, feature_records, in_store_order, load_ensemble, probe_classes, specialists_record,
    store_meta, targets_record,
)
from .base import TeacherKind

log = logging.getLogger(__name__)
_POOLS: dict[int, ProcessPoolExecutor] = {}


class _Batches(torch.utils.data.Dataset):
    """Lets a DataLoader fetch whole batches through ``TransferSet.get_batch`` — or, for views made on the
    device, what they are made from (``ViewSet.get_inputs``; :func:`_on_device` makes them)."""

    def __init__(self, data: TransferSet):
        self.data = data
        self.inputs = getattr(data, "device_views", False)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows):
        x, y = self.data.get_inputs(rows) if self.inputs else self.data.get_batch(rows)
        return x, y, torch.from_numpy(np.asarray(rows, dtype=np.int64))


def _on_device(x: Any, data: Any, device: torch.device) -> torch.Tensor:
    """A loader batch's inputs on the teachers' device: a tensor moved there, or views made there."""
    if isinstance(x, ViewInputs):
        return data.aug.make(x.to(device, non_blocking=True))
    return x.to(device, non_blocking=True)


def _chunk_batches(writer: StoreWriter, chunks: Iterable[int], batch_size: int):
    """Batches never straddle chunks, so a chunk is computed the same way on every run."""
    for i in chunks:
        start, stop = writer.bounds(i)
        for b in range(start, stop, batch_size):
            yield np.arange(b, min(b + batch_size, stop))


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """Start a device->host copy without waiting for it (pinned memory + an event on CUDA)."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return host, ev


def _check_finite_mask(finite: np.ndarray, names: Sequence[str], samples: np.ndarray) -> None:
    """finite [M, rows]: name the first member with NaN/Inf output and the samples (transfer-set positions)
    it failed on — what a user can look up, whatever the store's row order."""
    for name, ok in zip(names, finite):
        bad = np.sort(samples[np.flatnonzero(~ok)])
        if len(bad):
            shown = ", ".join(map(str, bad[:10])) + (f" … ({len(bad)} samples)" if len(bad) > 10 else "")
            raise NonFiniteLogitsError(f"teacher {name!r} produced NaN/Inf logits for samples {shown} "
                                       "(positions in the transfer set)")


def loader_workers(data: Any, device: torch.device, asked: int | None = None) -> int:
    """DataLoader processes feeding the teachers: ``asked``, or when none are asked for, none where a batch
    is one array slice (``data.decodes`` false), else up to 8 on a GPU and half the cores on the CPU, whose
    other half runs the forward. Always none where this process may not have children (a daemon, such as
    a plain multiprocessing pool's worker; darkstore's Celery pool processes are not: see celery_app)."""
    if multiprocessing.current_process().daemon:
        if asked:
            log.warning("this process is a daemon and may not start DataLoader workers: decoding inline")
        return 0
    if asked is not None:
        return asked
    if not getattr(data, "decodes", True):
        return 0
    cores = os.cpu_count() or 1
    return min(8, max(1, cores - 1)) if device.type == "cuda" else min(8, max(1, cores // 2))


def _writer_plan(device: torch.device, writers: int | None, max_inflight: int | None,
                 writer_processes: bool | None) -> tuple[int, int, bool]:
    """Writers, chunks allowed to wait for storage, and whether writes go to processes (see run_chunks)."""
    cuda = device.type == "cuda"
    if writers is None:
        writers = max(1, min(8, (os.cpu_count() or 2) // 2)) if cuda else 1
    if max_inflight is None:
        max_inflight = 2 * writers if cuda else 0
    if writer_processes is None:
        writer_processes = cuda and max_inflight > 0
    # a daemonic process may not start processes, whatever was asked
    return writers, max_inflight, writer_processes and not multiprocessing.current_process().daemon


class _ChunkSink:
    """Finished chunks on their way to the store: combined and checked on the compute thread, then cast,
    compressed and written by writer threads (or the processes they hand over to), committed in order of
    submission, each reported once it is committed."""

    def __init__(self, writer: StoreWriter, data, names: list[str], writers: int, processes: bool,
                 on_rows: Callable[[int], None] | None, on_chunk: Callable[[int, int], None] | None):
        self.writer, self.meta, self.data, self.names = writer, writer.meta, data, names
        self.views = data if self.meta.views else None
        self.procs = _writer_pool(writers) if processes else None
        self.pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="darkstore-writer")
        self.inflight: deque[tuple[int, int, Future]] = deque()
        self.on_rows, self.on_chunk = on_rows, on_chunk
        self.written = 0

    def submit(self, i: int, start: int, stop: int, z: torch.Tensor, y: np.ndarray,
               features: torch.Tensor | None = None, view_params: np.ndarray | None = None) -> None:
        # torch work (combine, argmax, checks) stays on this thread and the device; the writer thread
        # only casts, compresses and writes (numpy + zarr), so the two never fight over torch's threads
        meta = self.meta
        finite = torch.isfinite(z).all(dim=-1)  # [M, rows]
        ell = combine(z, meta.combine, meta.temperature, meta.specialists, self.names)
        y_dev = torch.from_numpy(y).to(z.device, non_blocking=True)
        form = form_of(meta)
        parts = {"finite": finite, "stats": _stats(z, ell, y_dev),
                 **form.encode(ell, meta, form.draws(meta, i, (stop - start,)))}
        if meta.keep_members:
            parts["members"] = z - z.amax(dim=-1, keepdim=True)
        if features is not None:
            parts["features"] = features
        if meta.dtype == "float16":  # cast here too (same rounding as numpy's), halving the copy
            for name in ("logits", "topk_logits", "members"):
                if name in parts and parts[name].is_floating_point():
                    parts[name] = parts[name].clamp_min(FLOAT16_FLOOR).half()
        hosts = {name: _to_host(t) for name, t in parts.items()}
        self.inflight.append((i, stop - start, self.pool.submit(self._write, i, start, stop, hosts, y, view_params)))

    def _write(self, i: int, start: int, stop: int, hosts: dict, y: np.ndarray,
               view_params: np.ndarray | None = None) -> None:
        for _, ev in hosts.values():
            if ev is not None:
                ev.synchronize()
        kw = {name: h.numpy() for name, (h, _) in hosts.items()}
        fin = kw.pop("finite")
        rows = np.arange(start, stop)
        if not fin.all():
            _check_finite_mask(fin, self.names, self.data.sample_of(rows))
        c = self.meta.num_classes
        if (y >= c).any():
            raise ClassCountMismatchError(
                f"labels up to {int(y.max())} in rows {start}..{stop - 1}, but the teachers predict {c} classes")
        kw.update(labels=y, index=self.data.sample_of(rows))
        if self.views is not None:  # row = (sample, view): the view's recorded parameters too
            kw.update(view_params=self.views.params(rows) if view_params is None else view_params)
        if self.procs is not None:
            self.procs.submit(write_chunk_at, str(self.writer.path), i, kw).result()
        else:
            self.writer.write_chunk(i, **kw)

    def _committed(self, i: int, rows: int) -> None:
        self.written += rows
        if self.on_rows:
            self.on_rows(rows)
        if self.on_chunk:
            self.on_chunk(i, rows)

    def drain(self, limit: int) -> None:
        """Wait until at most ``limit`` chunks are in flight; a writer's error goes up from here."""
        while len(self.inflight) > limit:
            i, rows, fut = self.inflight.popleft()
            fut.result()
            self._committed(i, rows)

    def close(self) -> None:
        """Never leave a write half-way: let queued chunks finish (or fail) and report the ones that
        committed, before an error (a cancel, a time limit, a bad chunk) goes up."""
        while self.inflight:
            i, rows, fut = self.inflight.popleft()
            if fut.exception() is None:
                self._committed(i, rows)
        self.pool.shutdown(wait=True)


def _writer_pool(n: int) -> ProcessPoolExecutor:
    """Writer processes, started once per process and kept for later jobs.

    Forked, like DataLoader workers (they never touch CUDA: numpy and zarr only; zarr resets its
    I/O thread after a fork), and all started here, before this job's loader threads run. Not
    spawned: a spawned child re-runs the caller's ``__main__`` — a script without an
    ``if __name__ == "__main__"`` guard would start its whole job again in every writer."""
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork"),
                                               initializer=_exit_with_parent, initargs=(os.getpid(),))
        pool.submit(os.getpid).result()  # a fork context launches every process on the first task
    return pool


def _exit_with_parent(parent: int) -> None:
    """In a writer process: exit once the process that forked it is gone (killed — a Celery pool process at
    its hard time limit, say — rather than shut down), instead of waiting on its queue forever."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="darkstore-writer-watchdog", daemon=True).start()


def _stats(z: torch.Tensor, ell: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """labeled rows, ensemble correct, each member's correct (on z's device)."""
    lab = y >= 0
    out = [lab.sum(), ((ell.argmax(-1) == y) & lab).sum()]
    out += [((zm.argmax(-1) == y) & lab).sum() for zm in z]
    return torch.stack(out).to(torch.int64)


class ClassTeachers(TeacherKind):
    name = Classes.name

    def prepare(self, spec, data, *, device, allow_code, roots, max_params, channels_last):
        """The ensemble loaded and probed on two samples for its class count, the views and features the job
        records, and the store's metadata."""
        dev = device
        names = spec.teachers.class_names or data.class_names
        declared = spec.teachers.num_classes or (len(spec.teachers.class_names) if spec.teachers.class_names else None)
        members = load_ensemble(spec.teachers, device=dev, allow_code=allow_code, roots=roots,
                                num_classes_hint=declared or (len(names) if names else None), max_params=max_params)
        try:
            x, _ = data.get_batch(np.arange(min(2, len(data))))
        except DarkstoreError:
            raise
        except Exception as exc:  # noqa: BLE001 — user datasets raise anything
            raise DataError(f"cannot read the transfer set's first samples: {type(exc).__name__}: {exc}") from exc
        c = probe_classes(members, x.to(dev), declared, spec.teachers.specialists)
        if names is not None and len(names) != c:
            raise ClassCountMismatchError(f"the teachers predict {c} classes but the data names {len(names)} classes")
        base = data
        views = None
        if spec.augment is not None:
            data = ViewSet(base, spec.augment, RowLayout(spec.augment.views))
            views = views_record(spec.augment, data.input_shape, dev)
        features = feature_records(spec, members, data, dev) if spec.features else None
        meta = store_meta(spec, members, data, c, names, base=base, views=views, targets=targets_record(spec, c),
                          features=features, specialists=specialists_record(spec))
        if channels_last:
            for mm in members:
                mm.module.to(memory_format=torch.channels_last)
        return PreparedJob(spec, members, data, meta, dev, channels_last)

    def run(self, job, writer, chunks, *, batch_size, on_rows, on_chunk, should_stop, num_workers=None,
            max_inflight=None, writers=None, writer_processes=None):
        """The rows' inputs through a DataLoader, the ensemble's forward, and the finished chunks to writer
        threads or processes (:func:`teacher_service.generate.run_chunks` says how many)."""
        writers, max_inflight, writer_processes = _writer_plan(job.device, writers, max_inflight, writer_processes)
        data = in_store_order(job.data, writer.meta)
        loader = torch.utils.data.DataLoader(
            _Batches(data), sampler=list(_chunk_batches(writer, chunks, batch_size)), batch_size=None,
            num_workers=loader_workers(data, job.device, num_workers), pin_memory=job.device.type == "cuda",
        )
        it = iter(loader)

        ens = job.ensemble
        sink = _ChunkSink(writer, data, [mm.name for mm in job.members], writers, writer_processes, on_rows, on_chunk)
        taps = None
        if writer.meta.features:
            taps = FeatureTaps(job.members, writer.meta.features)
        try:
            for i in chunks:
                if should_stop is not None and should_stop():
                    sink.drain(0)
                    raise Cancelled(f"stopped before chunk {i}; {sink.written} rows were committed in this run")
                start, stop = writer.bounds(i)
                outs, feats, ys, params, filled = [], [], [], [], 0
                while filled < stop - start:
                    x, y, idx = next(it)
                    if isinstance(x, ViewInputs):  # the parameters the views were made with: what the store records
                        params.append(x.params)
                    outs.append(ens.forward(_on_device(x, data, job.device), idx.numpy(), check=False))
                    if taps is not None:
                        feats.append(taps.collect())
                    ys.append(y.numpy())
                    filled += len(idx)
                sink.submit(i, start, stop, torch.cat(outs, dim=1), np.concatenate(ys).astype(np.int64),
                            torch.cat(feats) if feats else None, np.concatenate(params) if params else None)
                sink.drain(max_inflight)
            sink.drain(0)
        finally:
            sink.close()
            if taps is not None:
                taps.close()
        return sink.written

    def default_batch(self, meta):
        return 256
