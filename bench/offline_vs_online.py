"""Offline distillation (teachers run once into a store, then S students x E epochs read it) against
online distillation (the teachers run at every step of every student), generation included.

    ./dev bench offline_vs_online [--rows 4000 --students 3 --epochs 2]

The theoretical speed-up follows from measured unit costs: f = teacher forward per row (forward
only, no storage), s = student step per row (targets preloaded):
    online = S·E·N·(f + s),  offline = N·f + S·E·N·s,  theory = online / offline.
Last line: ``offline_speedup_vs_theory: <measured speed-up / theoretical>`` (target ≥ 0.9).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import images, machine, teachers

from darkstore.data import open_transfer_set
from darkstore.models import build_model
from storage import StoreWriter, open_store
from student_trainer import losses
from student_trainer.loader import make_loader
from teacher_service.combine import combine
from teacher_service.generate import prepare, run_chunks
from teacher_service.spec import JobSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="darkstore-bench-"))
    try:
        data_path = images(tmp / "x.npz", a.rows, classes=a.classes)
        members = teachers(tmp / "t", a.members, a.classes, "small_cnn", in_channels=3, width=a.width)
        spec = JobSpec.model_validate({"teachers": {"num_classes": a.classes, "members": members},
                                       "data": {"kind": "arrays", "path": str(data_path)}, "chunk_rows": 1024})
        job = prepare(spec)
        ens = job.ensemble
        data = open_transfer_set(spec.data)
        n, S, E, B = a.rows, a.students, a.epochs, a.batch_size

        def student():
            return build_model("mlp", a.classes, in_features=3 * 32 * 32, hidden=[256])

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
        t0 = time.perf_counter()
        w = StoreWriter.open_or_create(tmp / "store", job.meta)
        run_chunks(job, w, w.pending_chunks(), batch_size=B)
        t_gen = time.perf_counter() - t0
        store = open_store(tmp / "store")
        t0 = time.perf_counter()
        for k in range(S):
            torch.manual_seed(k)
            model = student()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            loader = make_loader(store, np.arange(n), batch_size=B, seed=k, data=data)
            for e in range(E):
                for b in loader.epoch(e):
                    step(model, opt, b.x, torch.log_softmax(b.logits.float() / 4.0, -1), b.labels)
        t_students = time.perf_counter() - t0
        offline = t_gen + t_students

        # -- online: the teachers run at every step of every student -----------------------
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
        online = time.perf_counter() - t0

        measured = online / offline
        theory = (S * E * n * (f + s_cost)) / (n * f + S * E * n * s_cost)
        print(f"machine: {machine()}")
        print(f"{n} rows x {a.classes} classes; teachers {a.members} x small_cnn(width {a.width}) on 3x32x32; "
              f"{S} students mlp(3072->256) x {E} epochs, batch {B}")
        print(f"unit costs: teacher forward f = {1e3 * f:.3f} ms/row, student step s = {1e3 * s_cost:.4f} ms/row")
        print(f"offline: generation {t_gen:.2f} s + students {t_students:.2f} s = {offline:.2f} s")
        print(f"online:  {online:.2f} s")
        print(f"speed-up measured {measured:.2f}x, theory {theory:.2f}x")
        print(f"offline_speedup_vs_theory: {measured / theory:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
