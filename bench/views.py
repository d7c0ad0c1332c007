"""What a recorded-views step costs: replayed views against the same views written out as a plain store.

    ./dev bench views [--samples 4096 --views 8 --repeats 7]

A views store keeps K recorded views per sample (here the CIFAR recipe: whole-pixel shifts of up to
±4 px, zero fill, and a horizontal flip) and rebuilds each view from the original input at training
time. The alternative is to write all N·K views out as images and distil from a plain store of them
(K× the input bytes, and the recipe is frozen). Variants, run interleaved, each for the same number
of steps of the same student (an MLP on 3×32×32 inputs, the cheapest step, so replay is not hidden;
and a small CNN):

- ``views``: the views store, one random view per sample per epoch, replayed on whole batches;
- ``per-row``: the same, replayed with recipe version 1's ops (torchvision; row by row where an op has no
  batched form: the previous releases);
- ``written-out``: the plain store of written-out views.

In process it prints time per step; as users run it, whole ``darkstore train`` processes (views
store, E epochs of one view per sample, against the written-out store for E/K epochs: the same
steps). Each line: the median of the paired ratios and their range.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import cli_seconds, paired, images, machine, teachers

from darkstore.transfer import open_transfer_set
from darkstore.models import build_model
from storage.schema import RowLayout
from darkstore.views import AugmentSpec, ViewSet
from storage import open_store
from student_trainer import losses
from student_trainer.loader import make_loader
from teacher_service.generate import generate
from teacher_service.spec import JobSpec

RECIPE = [{"op": "affine", "shift": 4}, {"op": "hflip", "p": 0.5}]


FAST_MAKE = AugmentSpec.make


def per_row(self, inp):
    """The previous releases' replay (recipe version 1): torchvision's ops, row by row where they have no
    batched form."""
    return FAST_MAKE(self.at_version(1), inp)


STUDENTS = {"mlp(3072->256->10)": ("mlp", {"in_features": 3 * 32 * 32, "hidden": [256]}),
            "small_cnn(width 16)": ("small_cnn", {"in_channels": 3, "width": 16})}


def steps_timer(store, rows, data, *, steps: int, batch: int, views_per_epoch: int | None, student: str):
    arch, kwargs = STUDENTS[student]

    def go() -> float:
        torch.manual_seed(0)
        model = build_model(arch, 10, **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = make_loader(store, rows, batch_size=batch, seed=0, data=data, views_per_epoch=views_per_epoch)
        t0, n = time.perf_counter(), 0
        for b in loader.epoch(1):
            loss = losses.kd_loss(model(b.x), torch.log_softmax(b.logits.float() / 4, -1), b.labels, temperature=4.0,
                                  alpha=0.9)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += 1
            if n == steps:
                break
        return (time.perf_counter() - t0) / n
    return go


def cli_timer(work: Path, store: str, epochs: int, extra: list[str]):
    return lambda: cli_seconds(work, ["train", "--store", store, "--out", "run", "--student-spec", "student.yaml",
                                      "--epochs", str(epochs), "--batch-size", "128", "--holdout", "0.05",
                                      "--threads", "2", "--overwrite", *extra])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cli-repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8, help="CLI runs: views-store epochs (written-out: epochs / views)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    k = a.views
    with tempfile.TemporaryDirectory(prefix="darkstore-bench-views-") as tmp:
        work = Path(tmp)
        arrays = images(work / "x.npz", a.samples, shape=(3, 32, 32), classes=10)
        ens = {"num_classes": 10, "members": teachers(work / "t", 2, 10, "mlp", in_features=3 * 32 * 32, hidden=[64])}
        aug = {"views": k, "ops": RECIPE}
        vspec = JobSpec.model_validate({"teachers": ens, "data": {"kind": "arrays", "path": str(arrays)},
                                        "chunk_rows": 1024, "augment": aug})
        vstore = open_store(generate(vspec, work / "views").path)
        base = open_transfer_set(vspec.data)
        x, y = ViewSet(base, AugmentSpec.model_validate(aug), RowLayout(k)).get_batch(np.arange(a.samples * k))
        np.savez(work / "out.npz", x=x.numpy(), y=y.numpy())
        ospec = JobSpec.model_validate({"teachers": ens, "data": {"kind": "arrays", "path": str(work / "out.npz")},
                                        "chunk_rows": 1024})
        ostore = open_store(generate(ospec, work / "written").path)
        odata = open_transfer_set(ospec.data)
        steps = a.samples // a.batch_size

        print(f"machine: {machine()}")
        print(f"{a.samples} samples 3x32x32, {k} views ({', '.join(o['op'] for o in RECIPE)}); batch {a.batch_size}, "
              f"{steps} steps a run")
        for student in STUDENTS:
            views = steps_timer(vstore, np.arange(a.samples * k), base, steps=steps, batch=a.batch_size,
                                views_per_epoch=1, student=student)
            written = steps_timer(ostore, np.arange(a.samples * k), odata, steps=steps, batch=a.batch_size,
                                  views_per_epoch=None, student=student)
            def slow() -> float:
                AugmentSpec.make = per_row
                try:
                    return views()
                finally:
                    AugmentSpec.make = FAST_MAKE

            for f in (views, written, slow):
                f()  # warm
            tv, tw, ts = [], [], []
            for _ in range(a.repeats):
                tv.append(views())
                tw.append(written())
                ts.append(slow())
            print(f"student {student}, in process, ms per step (median): views {1e3 * statistics.median(tv):.2f}, "
                  f"written-out {1e3 * statistics.median(tw):.2f}, per-row replay {1e3 * statistics.median(ts):.2f}")
            print(f"  views / written-out, per step:        {paired(tv, tw)}")
            print(f"  per-row / batched replay, per step:   {paired(ts, tv)}")

        (work / "student.yaml").write_text(yaml.safe_dump({"arch": "mlp", "arch_kwargs": {"in_features": 3072,
                                                                                          "hidden": [256]}}))
        cv = cli_timer(work, "views", a.epochs, ["--views-per-epoch", "1"])
        cw = cli_timer(work, "written", max(1, a.epochs // k), [])
        cv(), cw()
        pv, pw = [], []
        for _ in range(a.cli_repeats):
            pv.append(cv())
            pw.append(cw())
        print(f"whole `darkstore train` processes ({a.epochs} epochs of views vs {max(1, a.epochs // k)} of the "
              f"written-out store): views {statistics.median(pv):.1f} s, written-out {statistics.median(pw):.1f} s")
        print(f"views / written-out, whole process:   {paired(pv, pw)}")


if __name__ == "__main__":
    main()
