"""Many students from one store, through the CLI: a 16-point sweep against one ``darkstore train`` of the same
student (whole processes, what users run).

    ./dev bench sweep [--rounds 3 --epochs 10 --hidden 64]

Data: scikit-learn's bundled digits (1,797 real 8x8 images), a store generated once from three small CNN
teachers (random weights: the timing does not depend on what they know). Student: an MLP (64 -> hidden ->
10), batch 64. The sweep is T in {1, 2, 4, 8} x α in {0.25, 0.5, 0.75, 1}: 16 points that see the same
batches, so they train together in one process from one read of the store. Each round runs, alternated:

- one ``darkstore train`` (T = 4, α = 0.5);
- ``darkstore sweep`` of the 16 points (the default: together, the 16 students stacked into one vmapped
  model);
- ``darkstore sweep --no-stack`` (together, each student stepping alone in the shared loop);
- ``darkstore sweep --isolate`` of the same 16 points (one process per point, ``--parallel`` at a time:
  how sweeps ran before).

``--device cuda`` runs it all on the GPU; ``--student small_cnn`` trains a small CNN instead of the MLP;
``--synthetic N`` uses N random 8x8 images instead of the digits (no scikit-learn needed).

Printed: the median wall time of each, the wall time per student, and the medians of the paired ratios
with their range. Last line: ``sweep16_over_one_train: <median of sweep / train>`` (target ≤ 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from _common import machine, paired, teachers

TEMPERATURES, ALPHAS = [1.0, 2.0, 4.0, 8.0], [0.25, 0.5, 0.75, 1.0]


def cli(*args: str, cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"darkstore {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def student_spec(a) -> dict:
    if a.student == "mlp":
        return {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [a.hidden]}}
    return {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": a.hidden // 4}}


def setup(work: Path, a) -> dict:
    if a.synthetic:
        rng = np.random.default_rng(0)
        x, y = rng.random((a.synthetic, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, a.synthetic)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    np.savez(work / "digits.npz", x=x, y=y)
    members = teachers(work / "t", 3, 10, "small_cnn", in_channels=1, width=32)
    (work / "ensemble.yaml").write_text(yaml.safe_dump({"num_classes": 10, "members": members}, sort_keys=False))
    cli("generate", "--teachers", "ensemble.yaml", "--data", "digits.npz", "--out", "store", "--device", a.device,
        cwd=work)
    base = {"epochs": a.epochs, "batch_size": a.batch_size, "device": a.device, "student": student_spec(a)}
    (work / "grid.yaml").write_text(yaml.safe_dump({"store": "store", "base": base,
                                                    "grid": {"temperature": TEMPERATURES, "alpha": ALPHAS}}))
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=2, help="--isolate sweeps: processes at once")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--student", choices=["mlp", "small_cnn"], default="mlp")
    ap.add_argument("--synthetic", type=int, default=0, help="N random 8x8 images instead of the digits")
    ap.add_argument("--no-isolate", action="store_true", help="skip the --isolate sweeps")
    a = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="darkstore-bench-sweep-") as tmp:
        work = Path(tmp)
        base = setup(work, a)
        one, together, lockstep, isolated = [], [], [], []
        spec = student_spec(a)
        student = ["--student", spec["arch"], "--arch-kwargs", json.dumps(spec["arch_kwargs"]), "--device", a.device,
                   "--epochs", str(base["epochs"]), "--batch-size", str(base["batch_size"])]
        for r in range(a.rounds):
            one.append(cli("train", "--store", "store", "--out", f"one{r}", "--temperature", "4", "--alpha", "0.5",
                           *student, cwd=work))
            together.append(cli("sweep", "--grid", "grid.yaml", "--out", f"together{r}", cwd=work))
            lockstep.append(cli("sweep", "--grid", "grid.yaml", "--out", f"lockstep{r}", "--no-stack", cwd=work))
            if not a.no_isolate:
                isolated.append(cli("sweep", "--grid", "grid.yaml", "--out", f"isolated{r}", "--isolate",
                                    "--parallel", str(a.parallel), cwd=work))
            print(f"  round {r + 1}: train {one[-1]:.1f} s, sweep {together[-1]:.1f} s, sweep --no-stack "
                  f"{lockstep[-1]:.1f} s" + (f", sweep --isolate {isolated[-1]:.1f} s" if isolated else ""),
                  flush=True)
    n = len(TEMPERATURES) * len(ALPHAS)
    med = statistics.median
    what = f"{a.synthetic:,} random 8x8 images" if a.synthetic else "1,797 digits"
    print(f"\n{what}, student {spec['arch']} {spec['arch_kwargs']}, {a.epochs} epochs, batch {a.batch_size}, "
          f"{a.device}; {a.rounds} alternated rounds, medians")
    print(f"one darkstore train:           {med(one):6.1f} s")
    print(f"sweep, {n} points stacked:      {med(together):6.1f} s  ({med(together) / n:.2f} s a student); "
          f"sweep / train {paired(together, one)}")
    print(f"sweep --no-stack, {n} points:   {med(lockstep):6.1f} s  ({med(lockstep) / n:.2f} s a student); "
          f"no-stack / stacked {paired(lockstep, together)}")
    if isolated:
        print(f"sweep --isolate, {n} points:    {med(isolated):6.1f} s  ({med(isolated) / n:.2f} s a student); "
              f"isolate / stacked {paired(isolated, together)}")
    print(f"sweep16_over_one_train: {med([t / o for t, o in zip(together, one)]):.2f}")


if __name__ == "__main__":
    main()
