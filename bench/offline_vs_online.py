"""Offline distillation (teachers run once into a store, then S students x E epochs read it) against
online distillation (the teachers run at every step of every student), generation included.

    ./dev bench offline_vs_online [--rows 4000 --epochs 2 --cli-students 1,4,16 --rounds 3 --width 16]

1. **Through the CLI, whole processes** (what users run). Offline: ``darkstore generate --job`` then one
   ``darkstore sweep`` of S students that differ in their temperature (so they see the same batches, train
   together from one read of the store, and step as one stacked model); and the same as one command, a
   ``darkstore sweep`` whose grid names the job (``job:``), so it generates first in the same process.
   Generation runs at its default batch size. Online: S runs of
   ``bench/online_kd.py``, a plain-PyTorch online-distillation script, one process per student (teachers
   loaded, every batch through them and the student). Same student, loss, epochs and batch size. The variants alternate within each of ``--rounds``
   rounds; printed: the median wall time of each and the median of the paired ratios with their range.
2. **In process**, the figure the earlier version of this bench quoted: S students one after another in
   this process; the theoretical speed-up follows from measured unit costs, f = teacher forward per row
   (forward only, no storage), s = student step per row (targets preloaded):
   online = S·E·N·(f + s),  offline = N·f + S·E·N·s,  theory = online / offline.

The teachers are ``--members`` small CNNs of ``--width`` (16: tiny, about 10× a student step per row; 64:
heavier, as in real use); f/s is printed. Last lines: ``offline_speedup_vs_theory: <in-process measured /
theory>`` and, per student count S, ``cli_speedup_S_students: <median paired online / offline wall time>`` for
both offline forms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import HERE, images, machine, paired, teachers

from darkstore.transfer import open_transfer_set
from darkstore.models import build_model
from storage import StoreWriter, open_store
from student_trainer import losses
from student_trainer.loader import make_loader
from teacher_service.combine import combine
from teacher_service.generate import prepare, run_chunks
from teacher_service.spec import JobSpec


def cli(*args: str, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"darkstore {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def offline_cli(work: Path, tag: str, students: int, a, one_command: bool = False) -> float:
    """``darkstore generate`` + one ``darkstore sweep`` of ``students`` students (whole processes), or
    (``one_command``) one ``darkstore sweep`` whose grid names the job, so it generates first; wall seconds."""
    grid = {"store": f"store-{tag}", "base": {
        "epochs": a.epochs, "batch_size": a.batch_size, "holdout": 0, "alpha": 0.9,
        "student": {"arch": "mlp", "arch_kwargs": {"in_features": 3 * 32 * 32, "hidden": [a.hidden]}}},
        "grid": {"temperature": [round(4.0 + k / 8, 4) for k in range(students)]}}
    if one_command:
        grid["job"] = "job.yaml"
    (work / f"grid-{tag}.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    t0 = time.perf_counter()
    if not one_command:
        cli("generate", "--job", "job.yaml", "--out", f"store-{tag}", cwd=work)
    cli("sweep", "--grid", f"grid-{tag}.yaml", "--out", f"sweep-{tag}", cwd=work)
    return time.perf_counter() - t0


def online_cli(work: Path, students: int, a) -> float:
    """``students`` online-distillation processes, one after another; wall seconds."""
    t0 = time.perf_counter()
    for k in range(students):
        r = subprocess.run([sys.executable, str(HERE / "online_kd.py"), "--teachers", "ensemble.yaml", "--data",
                            "x.npz", "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--hidden",
                            str(a.hidden), "--seed", str(k)], cwd=work, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stdout + r.stderr)
    return time.perf_counter() - t0


def through_cli(work: Path, a) -> dict[int, tuple[list[float], list[float], list[float]]]:
    (work / "ensemble.yaml").write_text(yaml.safe_dump({"num_classes": a.classes, "members": teachers(
        work / "t", a.members, a.classes, "small_cnn", in_channels=3, width=a.width)}, sort_keys=False))
    images(work / "x.npz", a.rows, classes=a.classes)
    (work / "job.yaml").write_text(yaml.safe_dump({"teachers": "ensemble.yaml", "data": "x.npz"}))
    out: dict[int, tuple[list[float], list[float], list[float]]] = {}
    for rnd in range(a.rounds):
        for n in a.cli_students:
            off, one, on = out.setdefault(n, ([], [], []))
            runs = [lambda: off.append(offline_cli(work, f"{rnd}-{n}", n, a)),
                    lambda: one.append(offline_cli(work, f"{rnd}-{n}-one", n, a, one_command=True)),
                    lambda: on.append(online_cli(work, n, a))]
            for run in runs if rnd % 2 == 0 else runs[::-1]:  # alternate which variant goes first
                run()
            print(f"  round {rnd + 1}, {n} student(s): offline {off[-1]:.1f} s (one command {one[-1]:.1f} s), "
                  f"online {on[-1]:.1f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256, help="the student MLP's hidden width")
    ap.add_argument("--students", type=int, default=3, help="in-process part: students")
    ap.add_argument("--repeats", type=int, default=3, help="in-process part: alternated repeats")
    ap.add_argument("--cli-students", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                    help="CLI part: student counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="CLI part: alternating rounds")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="darkstore-bench-"))
    try:
        ratios, theory, f, s_cost = in_process(tmp, a)
        measured = statistics.median(ratios)
        work = tmp / "cli"
        work.mkdir()
        runs = through_cli(work, a)
        print(f"{a.rows} rows x {a.classes} classes; teachers {a.members} x small_cnn(width {a.width}) on 3x32x32; "
              f"students mlp(3072->{a.hidden}) x {a.epochs} epochs, batch {a.batch_size}")
        print(f"unit costs: teacher forward f = {1e3 * f:.3f} ms/row, student step s = {1e3 * s_cost:.4f} ms/row "
              f"(the teachers cost {f / s_cost:.1f}x a student step)")
        print(f"in process, {a.students} students: speed-up measured {measured:.2f}x (median of {len(ratios)} "
              f"alternated pairs, range {min(ratios):.2f}–{max(ratios):.2f}), theory {theory:.2f}x")
        print(f"through the CLI (whole processes, {a.rounds} alternating rounds; medians):")
        for n, (off, one, on) in runs.items():
            print(f"  {n:>2} student(s): generate + sweep {statistics.median(off):6.1f} s, sweep with the job "
                  f"{statistics.median(one):6.1f} s, online {statistics.median(on):6.1f} s")
            print(f"      online / (generate + sweep) {paired(on, off)};  online / (sweep with the job) "
                  f"{paired(on, one)}")
        print(f"offline_speedup_vs_theory: {measured / theory:.3f}")
        for n in sorted(runs):
            off, one, on = runs[n]
            print(f"cli_speedup_{n}_students: {statistics.median(x / y for x, y in zip(on, off)):.2f} (generate + "
                  f"sweep), {statistics.median(x / y for x, y in zip(on, one)):.2f} (one command)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def in_process(tmp: Path, a) -> tuple[list[float], float, float, float]:
    """The in-process measurement: (measured speed-ups, one per repeat; theoretical; f; s)."""
    torch.manual_seed(0)
    data_path = images(tmp / "x.npz", a.rows, classes=a.classes)
    members = teachers(tmp / "t", a.members, a.classes, "small_cnn", in_channels=3, width=a.width)
    spec = JobSpec.model_validate({"teachers": {"num_classes": a.classes, "members": members},
                                   "data": {"kind": "arrays", "path": str(data_path)}, "chunk_rows": 1024})
    job = prepare(spec)
    ens = job.ensemble
    data = open_transfer_set(spec.data)
    n, S, E, B = a.rows, a.students, a.epochs, a.batch_size

    def student():
        return build_model("mlp", a.classes, in_features=3 * 32 * 32, hidden=[a.hidden])

    def step(model, opt, x, tlogp, y):
        loss = losses.kd_loss(model(x), tlogp, y, temperature=4.0, alpha=0.9)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # -- unit costs (after a warm-up batch), at the batch size both paths use ------------
    x, _ = data.get_batch(np.arange(min(n, B)))
    ens.forward(x, np.arange(len(x)), check=False)
    t0 = time.perf_counter()
    for s in range(0, n, B):
        x, _ = data.get_batch(np.arange(s, min(n, s + B)))
        ens.forward(x, np.arange(len(x)), check=False)
    f = (time.perf_counter() - t0) / n
    pre_t = torch.randn(n, a.classes).log_softmax(-1)
    model = student()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(E):
        perm = rng.permutation(n)
        for s in range(0, n, B):
            r = perm[s:s + B]
            x, y = data.get_batch(r)
            step(model, opt, x, pre_t[r], y)
    s_cost = (time.perf_counter() - t0) / (E * n)

    # -- offline: generate once (teachers already loaded, as for online), then S students ----
    def offline(rep: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        w = StoreWriter.open_or_create(tmp / f"store{rep}", job.meta)
        run_chunks(job, w, w.pending_chunks(), batch_size=B)
        t_gen = time.perf_counter() - t0
        store = open_store(tmp / f"store{rep}")
        for k in range(S):
            torch.manual_seed(k)
            model = student()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            loader = make_loader(store, np.arange(n), batch_size=B, seed=k, data=data)
            for e in range(E):
                for b in loader.epoch(e):
                    step(model, opt, b.x, torch.log_softmax(b.logits.float() / 4.0, -1), b.labels)
        return t_gen, time.perf_counter() - t0

    # -- online: the teachers run at every step of every student -----------------------
    def online() -> float:
        t0 = time.perf_counter()
        for k in range(S):
            torch.manual_seed(k)
            model = student()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            rng = np.random.default_rng(k)
            for _ in range(E):
                perm = rng.permutation(n)
                for s in range(0, n, B):
                    r = perm[s:s + B]
                    x, y = data.get_batch(r)
                    z = ens.forward(x, r, check=False)
                    ell = combine(z, "geometric", 1.0)
                    step(model, opt, x, torch.log_softmax(ell / 4.0, -1), y)
        return time.perf_counter() - t0

    offs, ons = [], []
    for rep in range(a.repeats):  # alternated, so drift hits both alike
        t_gen, t_off = offline(rep)
        offs.append(t_off)
        ons.append(online())
        print(f"in process, repeat {rep + 1}: offline generation {t_gen:.2f} s + {S} students "
              f"{t_off - t_gen:.2f} s = {t_off:.2f} s; online {ons[-1]:.2f} s", flush=True)
    theory = (S * E * n * (f + s_cost)) / (n * f + S * E * n * s_cost)
    return [x / y for x, y in zip(ons, offs)], theory, f, s_cost

if __name__ == "__main__":
    main()
