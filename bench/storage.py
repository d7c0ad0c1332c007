"""Storage cost and fidelity: bytes per sample on disk for float32/float16 x zstd/blosc/none, and the
KL divergence between the float32 targets and each stored form at T = 1 and T = 4, on the logits of
real trained teachers (the digits demo's ensemble on scikit-learn's handwritten digits).

    ./dev bench storage [--teacher-epochs 40]

Last line: ``fp16_zstd_bytes_per_sample: <bytes>``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from _common import machine

from darkstore_app.demo import make_teachers, prepare_digits
from storage import open_store
from storage._zarr import disk_bytes
from teacher_service.generate import generate, prepare
from teacher_service.spec import EnsembleSpec, JobSpec


def softmax64(z: np.ndarray, t: float) -> np.ndarray:
    z = z.astype(np.float64) / t
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)
    return terms.sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="darkstore-bench-"))
    try:
        train_npz, _ = prepare_digits(tmp / "digits")
        make_teachers(train_npz, tmp / "teachers", epochs=a.teacher_epochs)
        ens = EnsembleSpec.from_file(tmp / "teachers" / "ensemble.yaml")
        base = {"teachers": ens, "data": {"kind": "arrays", "path": str(train_npz)}, "chunk_rows": a.chunk_rows}
        job = prepare(JobSpec.model_validate(base))
        n, c = job.meta.num_rows, job.meta.num_classes
        results = []
        reference = None
        for dtype in ("float32", "float16"):
            for comp in ("none", "zstd", "blosc"):
                out = tmp / f"{dtype}-{comp}"
                generate(JobSpec.model_validate({**base, "dtype": dtype, "compressor": comp}), out)
                r = open_store(out)
                got = r.read_all()
                # in sample order: each store keeps its rows in its own seeded order (index names each row's sample)
                z = got.logits[np.argsort(got.index)].astype(np.float64)
                if reference is None:  # float32 is what the teachers computed (the combine runs in float32)
                    reference = z
                arrays = sum(disk_bytes(out / name) for name in ("logits", "labels", "index", "stats", "done"))
                row = {"dtype": dtype, "compressor": comp, "bytes": disk_bytes(out) / n,
                       "logits": disk_bytes(out / "logits") / n, "arrays": arrays / n}
                for t in (1.0, 4.0):
                    d = kl(softmax64(reference, t), softmax64(z, t))
                    row[f"kl{t:g}"], row[f"kl{t:g}max"] = float(d.mean()), float(d.max())
                results.append(row)
        print(f"machine: {machine()}")
        print(f"teachers: the digits demo's 3 small CNNs trained {a.teacher_epochs} epochs; transfer set {n} digits, "
              f"{c} classes; chunks of {a.chunk_rows} rows")
        print(f"{'dtype':8s} {'compressor':10s} {'B/sample':>9s} {'logits B/s':>10s} "
              f"{'KL T=1 mean':>12s} {'max':>9s} {'KL T=4 mean':>12s} {'max':>9s}")
        for r in results:
            print(f"{r['dtype']:8s} {r['compressor']:10s} {r['bytes']:9.1f} {r['logits']:10.1f} "
                  f"{r['kl1']:12.2e} {r['kl1max']:9.1e} {r['kl4']:12.2e} {r['kl4max']:9.1e}")
        print(f"(B/sample: the whole store incl. labels, index and metadata; raw float16 logits are {2 * c} B/sample)")
        fp16 = next(r for r in results if r["dtype"] == "float16" and r["compressor"] == "zstd")
        print(f"fp16_zstd_bytes_per_sample: {fp16['bytes']:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
