"""What recorded views cost to generate: a views job against a plain job of as many rows, same teachers.

    ./dev bench views_generate [--samples 1024 --views 8 --repeats 5 --cli-repeats 3 --imagenet-samples 32]

A views job over N samples with K views computes N·K rows: for each, the recipe's parameters are drawn,
the view is made, and the teachers run on it. The bound is a plain job over N·K samples (the same
rows, already made): the teachers' forward and the store's writes, no views. Variants, run interleaved,
each from scratch into a new store:

- ``plain``: the plain job over the N·K written-out views;
- ``views``: recipe version 2 (parameters drawn for a whole batch, views made by darkstore's batched
  kernels where the teachers run, each sample decoded once for its K views; on a CPU a block of about
  1 MB of rows at a time);
- ``views whole batch``: the same, the whole batch in one go (how version 2 ran before blocks);
- ``views v1``: recipe version 1, the previous release (a generator per row, torchvision row by row),
  in process only, CIFAR-shaped only.

Two scenarios. CIFAR-shaped: the CIFAR recipe (±4 px shifts with zero fill, horizontal flip) and the
README's (resized crop, flip, colour jitter with all four factors, mixup), teachers two ``small_cnn``
(width 16) on 3×32×32 — teachers so cheap that the views' cost shows. ImageNet-shaped: the README's
recipe cropping to 224×224 from 3×256×256 samples, one ResNet-18 teacher with 1000 classes
(``--imagenet-samples 0`` skips it). In process it prints rows/s from the first chunk to the last
commit (teachers loaded, transfer set fingerprinted); as users run it, whole ``darkstore generate``
processes. Each ratio: the median of the paired ratios and their range.
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

from _common import alternate, cli_seconds, images, machine, med, paired, teachers

import darkstore.views as views_mod
from darkstore.transfer import open_transfer_set
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


def in_process(spec: JobSpec, out: Path, version: int, batch: int, block: int = views_mod.CPU_BLOCK_BYTES):
    """Seconds from the first chunk's start to the last commit (after loading teachers and fingerprinting);
    ``block``: how many bytes of rows version 2 makes at a time on the CPU (its default, or one whole batch)."""
    def go() -> float:
        views_mod.CPU_BLOCK_BYTES = block
        s = spec.model_copy(deep=True)
        if s.augment is not None:
            s.augment = s.augment.at_version(version)
        shutil.rmtree(out, ignore_errors=True)  # a finished store of the same job would make this a no-op
        started = []
        generate(s, out, batch_size=batch, on_start=lambda writer, chunks: started.append(time.perf_counter()))
        return time.perf_counter() - started[0]
    return go


def cli(work: Path, args: list[str], out: str, batch: int):
    def go() -> float:
        shutil.rmtree(work / out, ignore_errors=True)
        return cli_seconds(work, ["generate", *args, "--out", out, "--batch-size", str(batch)])
    return go


def scenario(work: Path, name: str, shape: tuple[int, int, int], n: int, k: int, ens: dict,
             recipes: dict[str, list[dict]], a: argparse.Namespace, batch: int) -> None:
    """Each recipe's views job against the plain job over its views written out: in process (with version 1,
    and version 2 made as one whole batch, beside the default), then as whole CLI processes."""
    rows = n * k
    (work / "ensemble.json").write_text(json.dumps(ens))
    arrays = images(work / "x.npz", n, shape=shape, classes=ens["num_classes"])
    print(f"\n## {name}: {n} samples {'x'.join(map(str, shape))} × {k} views = {rows} rows; "
          f"teachers: {len(ens['members'])} × {ens['members'][0]['arch']}; batch {batch}")
    for recipe, ops in recipes.items():
        aug = {"views": k, "ops": ops}
        (work / "augment.json").write_text(json.dumps(aug))
        vspec = JobSpec.model_validate({"teachers": ens, "data": {"kind": "arrays", "path": str(arrays)},
                                        "chunk_rows": 1024, "augment": aug})
        base = open_transfer_set(vspec.data)
        x, y = ViewSet(base, AugmentSpec.model_validate(aug), RowLayout(k)).get_batch(np.arange(rows))
        np.savez(work / "out.npz", x=x.numpy(), y=y.numpy())
        del x
        pspec = JobSpec.model_validate({"teachers": ens, "data": {"kind": "arrays", "path": str(work / "out.npz")},
                                        "chunk_rows": 1024})
        variants = {"plain": in_process(pspec, work / "p", 2, batch), "views": in_process(vspec, work / "v", 2, batch),
                    "views whole batch": in_process(vspec, work / "w", 2, batch, block=1 << 50)}
        if a.v1:
            variants["views v1"] = in_process(vspec, work / "v1", 1, batch)
        for f in variants.values():
            f()  # warm
        times = {v: [] for v in variants}
        for _ in range(a.repeats):
            for v, f in variants.items():
                times[v].append(f())
        print(f"\nrecipe {recipe}, in process, rows/s (median of {a.repeats}): "
              + ", ".join(f"{v} {rows / med(t):,.0f}" for v, t in times.items()))
        for v in variants:
            if v != "plain":
                print(f"  {v} / plain, time: {paired(times[v], times['plain'])}")
        print(f"  views whole batch / views (blocks), time: {paired(times['views whole batch'], times['views'])}")
        if a.v1:
            print(f"  views v1 / views, time:   {paired(times['views v1'], times['views'])}")

        pc = cli(work, ["--teachers", "ensemble.json", "--data", "out.npz"], "pc", batch)
        vc = cli(work, ["--teachers", "ensemble.json", "--data", "x.npz", "--views", str(k), "--augment",
                        "augment.json"], "vc", batch)
        pc(), vc()  # warm
        tp, tv = alternate(pc, vc, a.cli_repeats)
        print(f"  whole `darkstore generate` processes: plain {med(tp):.2f} s, views {med(tv):.2f} s; "
              f"views / plain {paired(tv, tp)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cli-repeats", type=int, default=3)
    ap.add_argument("--imagenet-samples", type=int, default=32,
                    help="samples of the ImageNet-shaped scenario (0: skip it)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="darkstore-bench-views-generate-") as tmp:
        work = Path(tmp)
        ens = {"num_classes": 10, "members": teachers(work / "t", 2, 10, "small_cnn", in_channels=3, width=16)}
        a.v1 = True
        scenario(work, "CIFAR-shaped", (3, 32, 32), a.samples, a.views, ens, RECIPES, a, 256)
    if a.imagenet_samples:
        with tempfile.TemporaryDirectory(prefix="darkstore-bench-views-generate-") as tmp:
            work = Path(tmp)
            ens = {"num_classes": 1000, "members": teachers(work / "t", 1, 1000, "resnet18")}
            readme = RECIPES["readme (crop, flip, jitter, mixup)"]
            recipe = {"readme at 224 (crop to 224, flip, jitter, mixup)":
                      [{**readme[0], "size": [224, 224]}, *readme[1:]]}
            a.v1 = False
            scenario(work, "ImageNet-shaped", (3, 256, 256), a.imagenet_samples, a.views, ens, recipe, a, 64)


if __name__ == "__main__":
    main()
