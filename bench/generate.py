"""Generation efficiency: a full job (transfer set -> ensemble -> combine -> Zarr) against the bare
ensemble forward over the same batches with no storage.

    ./dev bench generate [--rows 20000 --classes 100 --members 3 --width 32]

Last line: ``generate_efficiency: <bound time / full time>`` (1.0 = storage costs nothing).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from _common import alternate, paired_ratio, images, machine, med, teachers

from storage import StoreWriter
from teacher_service.generate import prepare, run_chunks
from teacher_service.kinds.classes import _Batches, _chunk_batches
from teacher_service.spec import JobSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--width", type=int, default=32, help="small_cnn width of each teacher")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--compressor", default="zstd")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--writers", type=int, default=None, help="writer threads (default: darkstore's choice)")
    ap.add_argument("--writer-mode", choices=["auto", "threads", "processes"], default="auto",
                    help="auto: darkstore's choice (processes on CUDA)")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="darkstore-bench-"))
    try:
        data = images(tmp / "x.npz", a.rows, classes=a.classes)
        members = teachers(tmp / "t", a.members, a.classes, "small_cnn", in_channels=3, width=a.width)
        spec = JobSpec.model_validate({"teachers": {"num_classes": a.classes, "members": members},
                                       "data": {"kind": "arrays", "path": str(data)}, "chunk_rows": a.chunk_rows,
                                       "dtype": a.dtype, "compressor": a.compressor})
        job = prepare(spec, device=a.device)
        ens = job.ensemble
        counter = iter(range(10**6))

        def full():
            out = tmp / f"store{next(counter)}"
            w = StoreWriter.open_or_create(out, job.meta)
            run_chunks(job, w, w.pending_chunks(), batch_size=a.batch_size, num_workers=a.num_workers,
                       writers=a.writers, writer_processes={"auto": None, "threads": False,
                                                            "processes": True}[a.writer_mode])
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            shutil.rmtree(out)

        def bound():
            w_bounds = StoreWriter.open_or_create(tmp / "shape", job.meta)
            loader = torch.utils.data.DataLoader(
                _Batches(job.data), sampler=list(_chunk_batches(w_bounds, range(job.meta.n_chunks), a.batch_size)),
                batch_size=None, num_workers=a.num_workers, pin_memory=a.device.startswith("cuda"))
            for x, _, idx in loader:
                ens.forward(x.to(job.device, non_blocking=True), idx.numpy(), check=False)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()

        full()  # warm up both paths
        bound()
        tb, tf = alternate(bound, full, a.repeats)
        b, f = med(tb), med(tf)
        print(f"machine: {machine()}")
        print(f"job: {a.rows} rows x {a.classes} classes, {a.members} x small_cnn(width {a.width}) on 3x32x32, "
              f"batch {a.batch_size}, chunks of {a.chunk_rows} rows, {a.dtype}/{a.compressor}, device {a.device}, "
              f"writers: {a.writer_mode}")
        print(f"forward only (bound): {b:.3f} s  ({a.rows / b:,.0f} rows/s)   runs {', '.join(f'{t:.3f}' for t in tb)}")
        print(f"full job:             {f:.3f} s  ({a.rows / f:,.0f} rows/s)   runs {', '.join(f'{t:.3f}' for t in tf)}")
        m, lo, hi = paired_ratio(tb, tf)
        print(f"median of the {a.repeats} paired ratios (the headline) {m:.3f}, range {lo:.3f}–{hi:.3f}")
        print(f"generate_efficiency: {m:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
