"""What verifying chunk checksums costs on reads.

    ./dev bench checksum [--rows 40000 --classes 1000 --repeats 7]

A schema-2 store keeps a CRC32C per chunk and row field; the reader checks every chunk it reads
against it (and checks targets finite). This bench reads a whole store through
``StoreReader.read_chunks`` in windows of 4 chunks, as the training loader does, with the check
on and with it switched off, interleaved; it prints the median of the paired time ratios and their
range. Last line: ``checksum_read_overhead: <checked / unchecked>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine

from storage import StoreMeta, StoreWriter, TeacherRecord, TransferSetRecord, open_store
from storage.reader import StoreReader


def make_store(path: Path, rows: int, classes: int, chunk_rows: int) -> Path:
    meta = StoreMeta(software_version="bench", created_at="now", job_key="b" * 64, num_rows=rows, num_classes=classes,
                     chunk_rows=chunk_rows, dtype="float16", compressor="zstd", combine="geometric", temperature=1.0,
                     keep_members=False,
                     teachers=[TeacherRecord(name="t", arch="mlp", format="safetensors", num_params=1)],
                     transfer_set=TransferSetRecord(spec={"kind": "arrays", "path": "x"}, fingerprint="f" * 64,
                                                    num_samples=rows))
    w = StoreWriter.open_or_create(path, meta)
    rng = np.random.default_rng(0)
    for i in range(meta.n_chunks):
        a, b = w.bounds(i)
        x = rng.normal(0, 4, (b - a, classes)).astype(np.float32)
        w.write_chunk(i, logits=x - x.max(1, keepdims=True), labels=rng.integers(0, classes, b - a),
                      index=np.arange(a, b))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=40000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="darkstore-bench-checksum-") as tmp:
        path = make_store(Path(tmp) / "s", a.rows, a.classes, a.chunk_rows)
        reader = open_store(path)
        chunks = reader.finished_chunks()
        checked = StoreReader._check

        def read() -> float:
            t0 = time.perf_counter()
            for w in range(0, len(chunks), 4):
                reader.read_chunks(chunks[w:w + 4], ["logits"])
            return time.perf_counter() - t0

        def unchecked() -> float:
            StoreReader._check = lambda self, c, name, values: None
            try:
                return read()
            finally:
                StoreReader._check = checked

        read(), unchecked()
        on, off = [], []
        for _ in range(a.repeats):
            on.append(read())
            off.append(unchecked())
        ratios = [x / y for x, y in zip(on, off)]
        mb = a.rows * a.classes * 2 / 2**20
        print(f"machine: {machine()}")
        print(f"store: {a.rows} rows x {a.classes} classes float16/zstd ({mb:.0f} MiB raw), chunks of {a.chunk_rows}")
        print(f"read, checked:   {statistics.median(on):.3f} s ({mb / statistics.median(on):,.0f} MiB/s)")
        print(f"read, unchecked: {statistics.median(off):.3f} s ({mb / statistics.median(off):,.0f} MiB/s)")
        print(f"checked / unchecked: median {statistics.median(ratios):.3f} (range {min(ratios):.3f}–{max(ratios):.3f}, "
              f"{len(ratios)} pairs)")
        print(f"checksum_read_overhead: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
