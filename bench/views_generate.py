"""What recorded views cost to generate: a views job against a plain job of as many rows, same teachers.

    ./dev bench views_generate [--samples 1024 --views 8 --repeats 5 --cli-repeats 3]

A views job over N samples with K views computes N·K rows: for each, the recipe's parameters are drawn,
the view is made, and the teachers run on it. The bound is a plain job over N·K samples (the same
rows, already made): the teachers' forward and the store's writes, no views. Variants, run interleaved,
each from scratch into a new store:

- ``plain``: the plain job over the N·K written-out views;
- ``views``: recipe version 2 (parameters drawn for a whole batch, views made by darkstore's batched
  kernels where the teachers run, each sample decoded once for its K views);
- ``views v1``: recipe version 1, the previous release (a generator per row, torchvision row by row),
  in process only.

Two recipes: the CIFAR one (±4 px shifts with zero fill, horizontal flip) and the README's
(resized crop, flip, colour jitter with all four factors, mixup). Teachers: two ``small_cnn`` (width 16)
on 3×32×32 inputs. In process it prints rows/s from the first chunk to the last commit
(teachers loaded, transfer set fingerprinted); as users run it, whole ``darkstore generate`` processes. Each ratio: the median of the paired ratios and their range.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import cli_seconds, images, machine, med, paired, teachers

from darkstore.data import open_transfer_set
from darkstore.views import AugmentSpec, ViewSet
from storage.schema import RowLayout
from teacher_service.generate import generate
from teacher_service.spec import JobSpec

RECIPES = {
    "cifar (shift 4 px, flip)": [{"op": "affine", "shift": 4}, {"op": "hflip", "p": 0.5}],
    "readme (crop, flip, jitter, mixup)": [
        {"op": "resized_crop", "scale": [0.35, 1.0], "size": [32, 32]}, {"op": "hflip", "p": 0.5},
        {"op": "color_jitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
        {"op": "mixup", "alpha": 0.2}],
}


def in_process(spec: JobSpec, out: Path, version: int):
    """Seconds from the first chunk's start to the last commit (after loading teachers and fingerprinting)."""
    def go() -> float:
        s = spec.model_copy(deep=True)
        if s.augment is not None:
            s.augment = s.augment.at_version(version)
        shutil.rmtree(out, ignore_errors=True)  # a finished store of the same job would make this a no-op
        started = []
        generate(s, out, batch_size=256, on_start=lambda writer, chunks: started.append(time.perf_counter()))
        return time.perf_counter() - started[0]
    return go


def cli(work: Path, args: list[str], out: str):
    def go() -> float:
        shutil.rmtree(work / out, ignore_errors=True)
        return cli_seconds(work, ["generate", *args, "--out", out, "--batch-size", "256"])
    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cli-repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    k, n = a.views, a.samples
    rows = n * k
    with tempfile.TemporaryDirectory(prefix="darkstore-bench-views-generate-") as tmp:
        work = Path(tmp)
        arrays = images(work / "x.npz", n, shape=(3, 32, 32), classes=10)
        ens = {"num_classes": 10, "members": teachers(work / "t", 2, 10, "small_cnn", in_channels=3, width=16)}
        (work / "ensemble.json").write_text(json.dumps(ens))
        print(f"machine: {machine()}")
        print(f"{n} samples 3x32x32 × {k} views = {rows} rows; teachers: 2 × small_cnn(width 16); batch 256")
        for name, ops in RECIPES.items():
            aug = {"views": k, "ops": ops}
            (work / "augment.json").write_text(json.dumps(aug))
            vspec = JobSpec.model_validate({"teachers": ens, "data": {"kind": "arrays", "path": str(arrays)},
                                            "chunk_rows": 1024, "augment": aug})
            base = open_transfer_set(vspec.data)
            x, y = ViewSet(base, AugmentSpec.model_validate(aug), RowLayout(k)).get_batch(np.arange(rows))
            np.savez(work / "out.npz", x=x.numpy(), y=y.numpy())
            pspec = JobSpec.model_validate({"teachers": ens, "data": {"kind": "arrays", "path": str(work / "out.npz")},
                                            "chunk_rows": 1024})
            variants = {"plain": in_process(pspec, work / "p", 2), "views": in_process(vspec, work / "v", 2),
                        "views v1": in_process(vspec, work / "v1", 1)}
            for f in variants.values():
                f()  # warm
            times = {v: [] for v in variants}
            for _ in range(a.repeats):
                for v, f in variants.items():
                    times[v].append(f())
            print(f"\nrecipe {name}, in process, rows/s (median of {a.repeats}): "
                  + ", ".join(f"{v} {rows / med(t):,.0f}" for v, t in times.items()))
            print(f"  views / plain, time:      {paired(times['views'], times['plain'])}")
            print(f"  views v1 / plain, time:   {paired(times['views v1'], times['plain'])}")
            print(f"  views v1 / views, time:   {paired(times['views v1'], times['views'])}")

            pc = cli(work, ["--teachers", "ensemble.json", "--data", "out.npz"], "pc")
            vc = cli(work, ["--teachers", "ensemble.json", "--data", "x.npz", "--views", str(k), "--augment",
                            "augment.json"], "vc")
            pc(), vc()
            tp, tv = [], []
            for _ in range(a.cli_repeats):
                tp.append(pc())
                tv.append(vc())
            print(f"  whole `darkstore generate` processes: plain {med(tp):.2f} s, views {med(tv):.2f} s; "
                  f"views / plain {paired(tv, tp)}")


if __name__ == "__main__":
    main()
