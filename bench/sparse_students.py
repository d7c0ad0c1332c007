"""Students trained from sparse targets vs dense ones, at equal storage: where each form loses.

    ./dev bench sparse_students [--seeds 5] [--per-class 10] [--epochs 30] [--parallel 2]

A 1,000-class task with known dark knowledge: 100 superclasses of 10 classes, class means
μ_c = superclass centre + N(0, 0.35²) in 32 dimensions, samples x = μ_y + N(0, 1). The teacher is the
Bayes posterior of that mixture, which is exactly linear (logits μ_c·x − |μ_c|²/2), saved as the
weights of darkstore's ``mlp`` with no hidden layer; its top-1 accuracy is the Bayes rate. The transfer
set has ``--per-class`` samples per class, the test set 20,000 fresh samples.

Every arm runs what a user runs: ``darkstore generate --targets …`` makes each store and
``darkstore sweep`` trains the seeds (whole processes), a linear student (AdamW, lr 3e-3, cosine,
batch 256, α = 0.9) at T = 1 and T = 4:

- dense float16 targets, and the hard-label student (α = 0) as the floor;
- top-k at K = 4, 16 and 64 (6K + 4 bytes a row: values, classes, tail mass), each trained with the
  bucket loss and with the spread loss;
- sampled at the same bytes (4K′ bytes: K′ = 7, 25 and 97 classes), one store sampled at T = 1 and one
  at T = 4 (a sampled store is unbiased at the temperature it was drawn at only).

It prints each store's bytes per row on disk, test accuracy (mean ± std over seeds), and each arm
minus dense at the same T with its standard error (within noise when |Δ| ≤ 2 SE; seeds pair up, the
error treats them as independent, which is conservative). Last line:
``sparse_students_topk16_t1_minus_dense_pt: <top-16 (bucket) student − dense student at T = 1, in points>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from _common import machine
from quality import cli, diff, ms, sweep_runs

C, SUPER, DIM, SPREAD, NOISE = 1000, 100, 32, 0.35, 1.0
RECIPE = {"batch_size": 256, "lr": 3e-3, "weight_decay": 1e-4, "alpha": 0.9, "schedule": "cosine"}
BUDGETS = [(4, 7), (16, 25), (64, 97)]  # (top-k K, sampled K') at 6K + 4 ≈ 4K' bytes a row


def make_task(work: Path, per_class: int) -> float:
    """Transfer and test sets (.npz) and the Bayes teacher (safetensors + ensemble.yaml); the teacher's test accuracy."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    mu = rng.normal(0, 1, (SUPER, DIM))[np.arange(C) // (C // SUPER)] + rng.normal(0, SPREAD, (C, DIM))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, C, n)
        return (mu[y] + rng.normal(0, NOISE, (n, DIM))).astype(np.float32), y.astype(np.int64)

    names = np.array([f"c{i}" for i in range(C)])
    xtr, ytr = sample(C * per_class)
    xte, yte = sample(20000)
    np.savez(work / "train.npz", x=xtr, y=ytr, class_names=names)
    np.savez(work / "test.npz", x=xte, y=yte, class_names=names)
    w, b = mu / NOISE ** 2, -(mu ** 2).sum(1) / (2 * NOISE ** 2)
    save_file({"net.1.weight": torch.from_numpy(w).float().contiguous(), "net.1.bias": torch.from_numpy(b).float()},
              str(work / "bayes.safetensors"))
    (work / "ensemble.yaml").write_text(yaml.safe_dump({"num_classes": C, "members": [
        {"name": "bayes", "arch": "mlp", "arch_kwargs": {"in_features": DIM, "hidden": []},
         "weights": str(work / "bayes.safetensors")}]}, sort_keys=False))
    return float(((xte.astype(np.float64) @ w.T + b).argmax(1) == yte).mean())


def stores() -> dict[str, str]:
    """name → --targets."""
    out = {"dense": "dense"}
    for k, ks in BUDGETS:
        out[f"topk:{k}"] = f"topk:{k}"
        out[f"sampled:{ks}@1"] = f"sampled:{ks}@1"
        out[f"sampled:{ks}@4"] = f"sampled:{ks}@4"
    return out


def arms() -> list[tuple[str, str, dict, dict]]:
    """(arm, store, base options, grid axes besides seed)."""
    out = [("hard", "dense", {"alpha": 0.0, "temperature": 1.0}, {}),
           ("dense", "dense", {}, {"temperature": [1.0, 4.0]})]
    for k, ks in BUDGETS:
        out.append((f"topk:{k}", f"topk:{k}", {}, {"temperature": [1.0, 4.0], "topk_loss": ["bucket", "spread"]}))
        out.append((f"sampled:{ks}@1", f"sampled:{ks}@1", {"temperature": 1.0}, {}))
        out.append((f"sampled:{ks}@4", f"sampled:{ks}@4", {"temperature": 4.0}, {}))
    return out


def run(work: Path, *, seeds: int, epochs: int, parallel: int, log) -> tuple[dict[str, float], dict]:
    """Generate every store and sweep every arm: (bytes per row on disk by store, accuracies by row label)."""
    from storage import open_store

    gen = ["generate", "--teachers", "ensemble.yaml", "--chunk-rows", "1024"]
    cli(*gen, "--data", "test.npz", "--out", "stores/test", cwd=work)
    size = {}
    for name, targets in stores().items():
        t0 = time.perf_counter()
        cli(*gen, "--data", "train.npz", "--targets", targets, "--out", f"stores/{name}", cwd=work)
        s = open_store(work / "stores" / name)
        size[name] = s.summary()["disk_bytes"] / s.meta.num_rows
        log(f"  store {name}: {size[name]:,.1f} bytes/row, {time.perf_counter() - t0:.1f} s")
    student = {"arch": "mlp", "arch_kwargs": {"in_features": DIM, "hidden": []}}
    acc: dict[tuple[str, float, str], list[float]] = {}
    for arm, store, opts, axes in arms():
        grid = {"store": f"stores/{store}", "eval_store": "stores/test",
                "base": {"student": student, **RECIPE, "epochs": epochs, **opts},
                "grid": {**axes, "seed": list(range(seeds))}}
        for r in sweep_runs(work, arm, grid, parallel, log):
            key = (arm, float(r.get("temperature", opts.get("temperature", 4.0))), r.get("topk_loss", "") if
                   arm.startswith("topk") else "")
            acc.setdefault(key, []).append(r["accuracy"])
    return size, acc


def report(teacher: float, size: dict[str, float], acc: dict, seeds: int) -> tuple[str, float]:
    lines = [f"Bayes teacher: {100 * teacher:.2f} %; students: test accuracy, mean ± std over {seeds} seeds; "
             "Δ = arm − dense at the same T, ± its standard error", "",
             "| targets | bytes/row | dense ÷ this | T | loss | accuracy | Δ vs dense | |", "|---|---|---|---|---|---|---|---|"]
    dense = {t: acc[("dense", t, "")] for t in (1.0, 4.0)}
    for (arm, t, loss), v in acc.items():
        store = "dense" if arm == "hard" else arm
        m, s = ms(v)
        cell = ""
        if arm not in ("dense", "hard"):
            d, se = diff(v, dense[t])
            within = abs(d) <= 2 * se + 1e-12
            cell = f"{100 * d:+.2f} ± {100 * se:.2f} pt | {'within noise' if within else 'LOSES' if d < 0 else 'gains'}"
        else:
            cell = " | "
        label = "hard labels (α = 0)" if arm == "hard" else arm
        lines.append(f"| {label} | {size[store]:,.1f} | {size['dense'] / size[store]:.1f}× | {t:g} | "
                     f"{loss or '—'} | {100 * m:.2f} ± {100 * s:.2f} % | {cell} |")
    headline = ms(acc[("topk:16", 1.0, "bucket")])[0] - ms(dense[1.0])[0]
    return "\n".join(lines), 100 * headline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=10, help="transfer-set samples per class")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--parallel", type=int, default=2, help="sweep processes at once")
    ap.add_argument("--out", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    a = ap.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    tmp = tempfile.TemporaryDirectory(prefix="darkstore-sparse-students-") if a.out is None else None
    work = Path(tmp.name) if tmp else a.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"machine: {machine()}")
    teacher = make_task(work, a.per_class)
    log(f"[1/2] {C:,} classes, {C * a.per_class:,} transfer rows; generate {len(stores()) + 1} stores -> {work}")
    size, acc = run(work, seeds=a.seeds, epochs=a.epochs, parallel=a.parallel, log=log)
    log(f"[2/2] done in {time.perf_counter() - t0:.0f} s\n")
    text, headline = report(teacher, size, acc, a.seeds)
    print(text)
    (work / "sparse_students.md").write_text(text + "\n")
    print(f"\nsparse_students_topk16_t1_minus_dense_pt: {headline:+.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
