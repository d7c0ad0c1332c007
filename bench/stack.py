"""Stacked students against students stepping one by one, in one process (``train_many``).

    ./dev bench stack [--students 16 --student thin_cnn --side 8 --rounds 3 --device cpu]

A store over ``--rows`` random ``--side``×``--side`` images from three small CNN teachers; then, alternated
in each round:

- one student alone (``train_many`` with one run);
- ``--students`` students that differ in T and α, stacked (one vmapped forward, one optimiser step);
- the same students with ``stack=False`` (each steps alone in the shared loop: one read of each batch, S
  forwards and S optimiser steps);
- the same students with ``stack="auto"`` (a sweep's default: the first steps timed both ways, then the
  faster way kept).

Which way wins depends on the model and the device: run it for each student and input size you sweep
(``--student small_cnn --side 32``, ``--side 64``, ``--student mlp``).

Every variant is what ``darkstore sweep`` runs inside its process, evaluation after each epoch included.
Printed: the median wall time of each, each variant over one student (so 16 students "costing 4 students"
reads 4.0×), and the medians of the paired ratios with their range. Last line:
``stacked_over_one: <median of S stacked / one>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from _common import images, machine, paired, teachers

from student_trainer.train import Run, TrainConfig, train_many

def student(name: str, side: int) -> dict:
    return {"mlp": {"arch": "mlp", "arch_kwargs": {"in_features": side * side, "hidden": [64]}},
            "small_cnn": {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 16}},
            "thin_cnn": {"arch": "thin_cnn", "arch_kwargs": {"in_channels": 1, "width": 8, "depth": 6}}}[name]


STUDENTS = ("mlp", "small_cnn", "thin_cnn")


def configs(a, n: int) -> list[TrainConfig]:
    base = TrainConfig(student=student(a.student, a.side), epochs=a.epochs, batch_size=a.batch_size,
                       device=a.device)
    grid = [(t, al) for t in (1.0, 2.0, 4.0, 8.0) for al in (0.25, 0.5, 0.75, 1.0)]
    return [base.model_copy(update={"temperature": t, "alpha": al}) for t, al in (grid * (n // 16 + 1))[:n]]


def timed_many(store: Path, out: Path, cfgs: list[TrainConfig], stack: bool | str) -> float:
    t0 = time.perf_counter()
    res = train_many([Run(c, out / f"s{i}") for i, c in enumerate(cfgs)], store, stack=stack)
    bad = [r for r in res if isinstance(r, BaseException)]
    if bad:
        raise SystemExit(f"training failed: {bad[0]!r}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", type=int, default=16)
    ap.add_argument("--student", choices=STUDENTS, default="thin_cnn")
    ap.add_argument("--side", type=int, default=8, help="input images are SIDE x SIDE, one channel")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    from teacher_service.generate import generate
    from teacher_service.spec import JobSpec

    with tempfile.TemporaryDirectory(prefix="darkstore-bench-stack-") as tmp:
        work = Path(tmp)
        data = images(work / "x.npz", a.rows, shape=(1, a.side, a.side), classes=10)
        members = teachers(work / "t", 3, 10, "small_cnn", in_channels=1, width=32)
        spec = JobSpec.model_validate({"teachers": {"num_classes": 10, "members": members},
                                       "data": {"kind": "arrays", "path": str(data)}})
        store = generate(spec, work / "store", device=a.device).path
        many = configs(a, a.students)
        timed_many(store, work / "warm-up", many[:2], True)  # first-use costs (torch._dynamo's import) untimed
        one, stacked, loop, auto = [], [], [], []
        for r in range(a.rounds):
            one.append(timed_many(store, work / f"one{r}", many[:1], True))
            stacked.append(timed_many(store, work / f"stacked{r}", many, True))
            loop.append(timed_many(store, work / f"loop{r}", many, False))
            auto.append(timed_many(store, work / f"auto{r}", many, "auto"))
            print(f"  round {r + 1}: one {one[-1]:.2f} s, {a.students} stacked {stacked[-1]:.2f} s, "
                  f"{a.students} one by one {loop[-1]:.2f} s, auto {auto[-1]:.2f} s", flush=True)
    med, s = statistics.median, a.students
    print(f"\n{a.rows} rows {a.side}x{a.side}, student {a.student} {student(a.student, a.side)['arch_kwargs']}, "
          f"{a.epochs} epochs, batch {a.batch_size}, {a.device}; {a.rounds} alternated rounds, medians")
    print(f"one student:               {med(one):7.2f} s")
    print(f"{s} students stacked:       {med(stacked):7.2f} s   stacked / one {paired(stacked, one)}")
    print(f"{s} students one by one:    {med(loop):7.2f} s   one-by-one / one {paired(loop, one)}")
    print(f"{s} students auto:          {med(auto):7.2f} s   auto / one {paired(auto, one)}")
    print(f"one-by-one / stacked: {paired(loop, stacked)}")
    print(f"auto / the faster of the two: {paired(auto, [min(x, y) for x, y in zip(stacked, loop)])}")
    print(f"stacked_over_one: {med([x / y for x, y in zip(stacked, one)]):.2f}")


if __name__ == "__main__":
    main()
