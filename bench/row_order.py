"""Does a class-sorted store train as well as a shuffled one? Students from both row orders, over seeds.

    ./dev bench row_order [--seeds 5] [--epochs 10] [--per-class 60]

A transfer set sorted by class (as an image folder is) is stored twice by ``darkstore generate``: in
natural order and in the default shuffled order. The same student (MLP 64-32-C) is then trained from
each with ``darkstore train`` (whole processes, seeds interleaved between the two orders) and scored by
its top-1 agreement with the teachers on a 25 % holdout. The loader's shuffle window is what should make
the orders alike; the tests check that the batches it delivers are as mixed as a full shuffle, and this
bench reports what that means for the student: each order's mean ± std over seeds, the paired
difference (natural − shuffled) with its standard error, and whether it is within noise (|Δ| ≤ 2 SE).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

import torch

from _common import machine
from darkstore.models import build_model, save_weights

CLASSES = 10


def sorted_set(path: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(CLASSES), per_class)
    centres = rng.normal(0, 1, (CLASSES, 1, 8, 8)).astype(np.float32)
    x = (centres[y] + 0.8 * rng.normal(0, 1, (len(y), 1, 8, 8))).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def teacher(work: Path) -> Path:
    """One MLP teacher with spread-out logits (random weights × 3), so its argmax is learnable."""
    torch.manual_seed(0)
    model = build_model("mlp", CLASSES, in_features=64, hidden=[32])
    for p in model.parameters():
        p.data.mul_(3.0)
    save_weights(model, work / "t0.safetensors")
    member = {"name": "t0", "arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [32]},
              "weights": "t0.safetensors"}
    (work / "ensemble.yaml").write_text(yaml.safe_dump({"num_classes": CLASSES, "members": [member]}))
    return work / "ensemble.yaml"


def darkstore(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)


def agreement(work: Path, order: str, seed: int, epochs: int) -> float:
    out = work / "runs" / f"{order}_{seed}"
    darkstore("train", "--store", str(work / order), "--out", str(out), "--student", "mlp",
              "--arch-kwargs", '{"in_features": 64, "hidden": [32]}', "--epochs", str(epochs),
              "--batch-size", "32", "--holdout", "0.25", "--seed", str(seed), "--lr", "3e-3")
    return json.loads((out / "summary.json").read_text())["final"]["agreement"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=60)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="darkstore-bench-row-order-"))
    data = sorted_set(work / "sorted.npz", args.per_class)
    ens = teacher(work)
    for order in ("natural", "shuffled"):
        darkstore("generate", "--teachers", str(ens), "--data", str(data), "--out",
                  str(work / order), "--chunk-rows", "32", "--row-order", order)
    acc: dict[str, list[float]] = {"natural": [], "shuffled": []}
    for seed in range(args.seeds):  # interleaved: drift hits both orders alike
        for order in acc:
            acc[order].append(agreement(work, order, seed, args.epochs))
    diffs = [a - b for a, b in zip(acc["natural"], acc["shuffled"])]
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    print(f"# row order: {CLASSES * args.per_class} class-sorted rows, {args.seeds} seeds, {args.epochs} epochs; "
          f"{machine()}")
    print("| store order | agreement with the teachers (mean ± std) |\n|---|---|")
    for order, xs in acc.items():
        print(f"| {order} | {100 * statistics.fmean(xs):.2f} ± {100 * statistics.stdev(xs):.2f} % |")
    verdict = "within noise" if abs(mean) <= 2 * se else "beyond noise"
    print(f"\nnatural − shuffled, paired by seed: {100 * mean:+.2f} ± {100 * se:.2f} pt (SE), {verdict}")


if __name__ == "__main__":
    main()
