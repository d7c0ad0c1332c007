"""The pure generation function: job spec -> store.

The CLI (`darkstore generate`), the local runner and the Celery workers all end
in :func:`run_chunks`; only how chunks are handed out differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from darkstore.data import TransferSet
from darkstore.transfer import open_transfer_set
from darkstore.fingerprint import FingerprintPolicy
from storage import StoreMeta, StoreWriter
from storage.kinds import kind_for_data
from darkstore.device import check_device
from darkstore.errors import SpecError

from .prepared import (
    PreparedJob,
)
from .kinds import TEACHERS
from .spec import JobSpec

log = logging.getLogger(__name__)


OnRows = Callable[[int], None]


def prepare(
    spec: JobSpec,
    *,
    device: str = "cpu",
    allow_code: bool = False,
    roots: Sequence[str | Path] | None = None,
    data: TransferSet | None = None,
    channels_last: bool = False,
    max_params: int | None = None,
    fingerprints: FingerprintPolicy | None = None,
) -> PreparedJob:
    """Open the data, load the teachers, check they fit each other, build the store's metadata."""
    check_device(device)
    dev = torch.device(device)
    data = data or open_transfer_set(spec.data, allow_code=allow_code, roots=roots, fingerprints=fingerprints,
                                     prompts=spec.responses and spec.responses.n)
    kind = TEACHERS[kind_for_data(spec.data.kind).name]
    job = kind.prepare(spec, data, device=dev, allow_code=allow_code, roots=roots, max_params=max_params,
                       channels_last=channels_last)
    return _ordered(spec, job)


def _ordered(spec: JobSpec, job: PreparedJob) -> PreparedJob:
    """The job with its store's row order (shuffled: the seed comes from the job key, so every worker derives
    the same order)."""
    if spec.row_order == "shuffled":
        job.meta = job.meta.model_copy(update={"row_order": "shuffled", "row_order_seed": int(job.meta.job_key[:15], 16)})
    return job


def run_chunks(
    job: PreparedJob,
    writer: StoreWriter,
    chunks: Sequence[int],
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    on_rows: OnRows | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_inflight: int | None = None,
    writers: int | None = None,
    writer_processes: bool | None = None,
) -> int:
    """Compute and commit ``chunks`` (already-committed ones are skipped). Returns rows written.

    On a GPU the device computes the next chunks while writer threads (half the CPU cores, at
    most 8: chunks are independent files) compress and write finished ones: at most
    ``max_inflight`` chunks wait for storage (default two per writer), so memory stays bounded
    whatever the store's size. On the CPU the forward already uses every core
    torch is given, and a concurrent writer only slows it (measured: bench/generate.py), so the
    default there is 0: each chunk is written before the next is computed. Inputs come from ``num_workers`` DataLoader
    processes (default: :func:`loader_workers`; pinned memory and non-blocking copies on CUDA). ``on_rows(rows)`` and
    ``on_chunk(chunk, rows)`` are called after each commit.

    ``writer_processes``: on CUDA the compression and zarr writes run in ``writers`` forked
    processes (each writer thread hands its chunk to one and waits, holding no GIL), because
    threads alone contend for the GIL with the compute thread (profiled on an H100: a 2 MB write
    took 37 ms inside the job vs 15 ms alone). Default: on CUDA, unless this process is a daemon
    (a daemon may not have children: threads there; darkstore's Celery pool processes are not daemons);
    ``writer_processes`` True/False overrides.

    ``should_stop`` is asked before each chunk; when it answers True the chunks in flight are
    committed and the run raises :class:`Cancelled`. Any error stops the run; chunks already
    handed to the writer are finished first, and a failing chunk is never committed."""
    done = writer.done_mask()
    chunks = [i for i in chunks if not done[i]]
    if not chunks:
        return 0
    batch_size = batch_size or default_batch(writer.meta)
    kind = TEACHERS[writer.meta.kind.name]
    return kind.run(job, writer, chunks, batch_size=batch_size, on_rows=on_rows, on_chunk=on_chunk,
                    should_stop=should_stop, num_workers=num_workers, max_inflight=max_inflight, writers=writers,
                    writer_processes=writer_processes)


def default_batch(meta: StoreMeta) -> int:
    """Rows per forward pass when none is asked for (the row kind's: 256 rows of classes, or token rows of
    about 8,192 positions)."""
    return TEACHERS[meta.kind.name].default_batch(meta)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the chunks ``c`` with ``c % count == index``. N plain ``generate`` processes
    (on N machines sharing the store's filesystem or bucket), one per shard, fill one store and compute each
    chunk once; shard 0 creates the store, the others wait for it."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise SpecError(f"shard {self.index}/{self.count}: give I/N with 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        i, sep, n = text.partition("/")
        try:
            if not sep:
                raise ValueError
            index, count = int(i), int(n)
        except ValueError:
            raise SpecError(f"--shard {text!r}: give I/N, e.g. 0/2 and 1/2 for two processes") from None
        return cls(index, count)

    def chunks(self, pending: Sequence[int]) -> list[int]:
        return [c for c in pending if c % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def open_for(job: PreparedJob, out: str | Path, *, overwrite: bool = False, shard: Shard | None = None,
             wait: float = 600.0) -> StoreWriter:
    """The store ``job`` writes at ``out``: created (or reopened to resume) here, or, for a shard other than
    the first, opened once shard 0 has created it (waiting at most ``wait`` seconds)."""
    if shard is None or shard.index == 0:
        return StoreWriter.open_or_create(out, job.meta, overwrite=overwrite)
    if overwrite:
        raise SpecError(f"--overwrite belongs to shard 0/{shard.count}, which creates the store; shard {shard} "
                        "writes into the store it made")
    return StoreWriter.open_when_created(out, job.meta, timeout=wait, who=f"shard {shard}")


def generate(
    spec: JobSpec,
    out: str | Path,
    *,
    device: str = "cpu",
    batch_size: int | None = None,
    num_workers: int | None = None,
    allow_code: bool = False,
    overwrite: bool = False,
    roots: Sequence[str | Path] | None = None,
    on_start: Callable[[StoreWriter], None] | None = None,
    on_rows: OnRows | None = None,
    should_stop: Callable[[], bool] | None = None,
    channels_last: bool = False,
    shard: Shard | None = None,
    wait: float = 600.0,
    fingerprints: FingerprintPolicy | None = None,
    writer_processes: bool | None = None,
) -> StoreWriter:
    """Run ``spec`` into the store at ``out``; resumes an interrupted run, does nothing for a finished one.
    ``shard``: compute only that shard's chunks (see :class:`Shard`; ``wait``: how long a shard other than the
    first waits for the store to be created). ``on_start(writer, chunks)`` gets the chunks this call will
    compute. ``fingerprints``: how the transfer set is fingerprinted (default: every file hashed).
    ``writer_processes``: see :func:`run_chunks` (None: processes on CUDA, threads elsewhere)."""
    job = prepare(spec, device=device, allow_code=allow_code, roots=roots, channels_last=channels_last,
                  fingerprints=fingerprints)
    try:
        writer = open_for(job, out, overwrite=overwrite, shard=shard, wait=wait)
        chunks = shard.chunks(writer.pending_chunks()) if shard else writer.pending_chunks()
        if on_start:
            on_start(writer, chunks)
        run_chunks(job, writer, chunks, batch_size=batch_size, num_workers=num_workers, on_rows=on_rows,
                   should_stop=should_stop, writer_processes=writer_processes)
    finally:
        job.close()
    return writer
