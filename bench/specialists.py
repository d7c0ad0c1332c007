"""Does a generalist + specialists teach better than the generalist alone? Hinton et al.'s recipe, end to end.

    ./dev bench specialists [--seeds 5 --epochs 40]

Data with real confusions, made here: 40 classes in 8 groups of 5 (32-dimensional Gaussians: groups far
apart, the classes of a group close, unit noise), 200 training and 100 test samples per class. Everything
else goes through the CLI, as a user runs it:

1. a generalist (an MLP with one hidden layer of 32, plain cross-entropy, trained here) -> ``generate``;
2. ``specialists plan --num 8`` on its store, then ``specialists train`` (each initialised from the
   generalist, its classes oversampled to about half, ``--alpha 0.5`` with the generalist's soft targets,
   the dustbin corrected);
3. ``generate --combine specialists --top-n 2`` over the training and the test set;
4. students (the same small MLP, fresh) distilled from the generalist's store and from the combined store,
   ``--seeds`` seeds each, evaluated on the test set's labels.

It prints the generalist's and the combination's test accuracy (overall, and on the classes the specialists
cover), the active specialists per row, and each student arm's mean ± std with the paired difference.
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
import torch
import torch.nn.functional as F
import yaml

from _common import ROOT, machine

from storage import open_store

CLASSES, GROUPS, DIM = 40, 8, 32


def make_data(out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    group_centres = rng.normal(0, 4.0, (GROUPS, DIM))
    centres = np.repeat(group_centres, CLASSES // GROUPS, axis=0) + rng.normal(0, 0.45, (CLASSES, DIM))
    for name, per in (("train", 200), ("test", 100)):
        y = np.repeat(np.arange(CLASSES), per)
        x = centres[y] + rng.normal(0, 1.0, (len(y), DIM))
        p = rng.permutation(len(y))
        np.savez(out / f"{name}.npz", x=x[p].astype(np.float32), y=y[p],
                 class_names=np.array([f"g{k // (CLASSES // GROUPS)}c{k % (CLASSES // GROUPS)}" for k in range(CLASSES)]))


def train_generalist(out: Path, epochs: int) -> dict:
    from safetensors.torch import save_file

    from darkstore.models import MLP

    d = np.load(out / "train.npz")
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    torch.manual_seed(0)
    m = MLP(DIM, CLASSES, hidden=[32])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), 64):
            idx = perm[s:s + 64]
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / "generalist.safetensors"))
    return {"name": "generalist", "arch": "mlp", "arch_kwargs": {"in_features": DIM, "hidden": [32]},
            "weights": str(out / "generalist.safetensors")}


def cli(*args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], cwd=cwd, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(f"darkstore {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def store_accuracy(path: Path, covered: set[int]) -> tuple[float, float]:
    rows = open_store(path).read_all()
    hit = rows.logits.argmax(1) == rows.labels
    mask = np.isin(rows.labels, sorted(covered))
    return float(hit.mean()), float(hit[mask].mean())


def ms(v: list[float]) -> str:
    return f"{100 * statistics.fmean(v):.2f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.2f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--top-n", type=int, default=2)
    args = ap.parse_args()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="darkstore-specialists-"))
    t0 = time.perf_counter()
    make_data(work)
    gen = train_generalist(work, 15)
    (work / "generalist.yaml").write_text(yaml.safe_dump({"members": [gen]}))
    for split in ("train", "test"):
        cli("generate", "--teachers", "generalist.yaml", "--data", f"{split}.npz", "--out", f"g-{split}",
            "--dtype", "float32", cwd=work)
    cli("specialists", "plan", "--store", "g-train", "--num", str(GROUPS), "--out", "plan.yaml", cwd=work)
    plan = yaml.safe_load((work / "plan.yaml").read_text())
    covered = {k for sp in plan["specialists"] for k in sp["classes"]}
    cli("specialists", "train", "--plan", "plan.yaml", "--out", "sp", "--epochs", "20", "--alpha", "0.5",
        "--lr", "2e-3", cwd=work)
    for split in ("train", "test"):
        cli("generate", "--teachers", "sp/ensemble.yaml", "--data", f"{split}.npz", "--combine", "specialists",
            "--top-n", str(args.top_n), "--out", f"c-{split}", "--dtype", "float32", cwd=work)
    g_all, g_cov = store_accuracy(work / "g-test", covered)
    c_all, c_cov = store_accuracy(work / "c-test", covered)

    from teacher_service.specialists import SpecialistSets, active_specialists

    gl = torch.from_numpy(open_store(work / "g-test").read_all().logits).double()
    sets = SpecialistSets.of([sp["classes"] for sp in plan["specialists"]], CLASSES)
    active = active_specialists(torch.softmax(gl, -1), sets, args.top_n).sum(1).double()

    print(f"{CLASSES} classes in {GROUPS} groups; plan: {len(plan['specialists'])} specialists covering "
          f"{len(covered)} classes ({len(plan['uncovered'])} uncovered), sizes "
          f"{sorted(sp['size'] for sp in plan['specialists'])}")
    print(f"teachers on the test set: generalist {100 * g_all:.2f} % (covered classes {100 * g_cov:.2f} %); "
          f"generalist + specialists {100 * c_all:.2f} % ({100 * c_cov:.2f} %); active specialists per row "
          f"{float(active.mean()):.2f} (top-{args.top_n})")
    arms: dict[str, list[float]] = {"generalist": [], "combined": []}
    student = json.dumps({"in_features": DIM, "hidden": [32]})
    for seed in range(args.seeds):  # arms alternate
        for arm, store in (("generalist", "g-train"), ("combined", "c-train")):
            run = work / "runs" / f"{arm}-{seed}"
            cli("train", "--store", store, "--eval-store", "g-test", "--student", "mlp", "--arch-kwargs", student,
                "--epochs", str(args.epochs), "--batch-size", "64", "--lr", "2e-3", "--temperature", "2",
                "--alpha", "0.9", "--seed", str(seed), "--out", str(run), cwd=work)
            arms[arm].append(json.loads((run / "summary.json").read_text())["final"]["accuracy"])
    d = [b - a for a, b in zip(arms["generalist"], arms["combined"])]
    print(f"students (MLP 32, T=2, alpha=0.9, {args.epochs} epochs, {args.seeds} seeds), test accuracy: "
          f"from the generalist {ms(arms['generalist'])}, from generalist + specialists {ms(arms['combined'])}")
    print(f"combined - generalist, paired by seed: {100 * statistics.fmean(d):+.2f} ± "
          f"{100 * (statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0):.2f} pt (mean ± standard error); "
          f"teachers {100 * (c_all - g_all):+.2f} pt ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
