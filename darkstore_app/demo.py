"""`darkstore demo`: the whole pipeline on scikit-learn's bundled handwritten digits.

1. split the 1797 real 8x8 digits into a transfer set and a held-out test set;
2. train a small ensemble of teachers on the transfer set (plain supervised);
3. run the ensemble once over both sets through the same generation code as
   `darkstore generate`, into two stores;
   plus a views store: K recorded views of each transfer sample (view 0 clean, then mixup
   views), the teachers' targets computed on exactly those views;
4. train the same small student with hard labels only (baseline, α = 0), with
   distillation from the clean store, and with distillation from the views (the same
   number of steps) — once with each view's own targets, once with its sample's clean
   targets (the stale-target baseline) — over several seeds, evaluating on the test store;
5. print the table: teachers, ensemble, baseline and the distilled students, and each arm's
   difference from another with its standard error over the seeds, saying when it is within
   the seed spread. Which arm leads by a few errors differs between machines (floating point
   differs between CPUs); the demo says only what its own seeds support.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from darkstore.models import ModelSpec, build_model, save_weights

#: the teachers: small CNNs that differ by width and seed
TEACHERS = [
    {"name": "cnn_a", "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 32}, "seed": 1},
    {"name": "cnn_b", "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 24}, "seed": 2},
    {"name": "cnn_c", "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 32}, "seed": 3},
]
#: the student: a tiny MLP on the 64 raw pixels
STUDENT = {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [256]}}
TEACHER_EPOCHS = 40
STUDENT_EPOCHS = 100
TEMPERATURE = 4.0
ALPHA = 0.9
#: the views variant: K recorded views per sample (view 0 clean); the student trains on every view
#: each epoch for STUDENT_EPOCHS / K epochs — the same number of steps as the clean-target student
VIEWS = {"views": 4, "ops": [{"op": "mixup", "alpha": 0.2}]}
TEST_FRACTION = 1 / 3
#: a difference between two arms' mean errors counts as beyond the seed spread only past this many
#: standard errors (with 3 seeds, a hint rather than a finding: bench/quality.py compares recipes)
SPREAD_SE = 2.0
#: the differences the demo reports: (arm, the arm it is compared with)
COMPARISONS = [("distilled", "baseline"), ("views", "distilled"), ("views", "baseline"), ("stale", "baseline")]


def prepare_digits(out: Path) -> tuple[Path, Path]:
    """Write the transfer set and the test set as .npz (x [N,1,8,8] in [0,1], y, class names)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=TEST_FRACTION,
                                          random_state=0, stratify=d.target)
    out.mkdir(parents=True, exist_ok=True)
    names = np.array([str(i) for i in range(10)])
    np.savez(out / "train.npz", x=xtr, y=ytr, class_names=names)
    np.savez(out / "test.npz", x=xte, y=yte, class_names=names)
    return out / "train.npz", out / "test.npz"


def fit_supervised(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int,
                   lr: float = 2e-3, batch_size: int = 64) -> torch.nn.Module:
    """Plain cross-entropy training with light shift augmentation (how the teachers are made)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(x) + batch_size - 1) // batch_size))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            xb = x[idx]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def make_teachers(train_npz: Path, tdir: Path, *, epochs: int = TEACHER_EPOCHS) -> list[dict]:
    """Train the demo's teachers on ``train_npz``; write safetensors and ``ensemble.yaml`` to ``tdir``."""
    with np.load(train_npz) as z:
        x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    members = []
    for t in TEACHERS:
        torch.manual_seed(t["seed"])
        model = fit_supervised(build_model(t["arch"], 10, **t["arch_kwargs"]), x, y, epochs=epochs, seed=t["seed"])
        save_weights(model, tdir / f"{t['name']}.safetensors")
        members.append({"name": t["name"], "arch": t["arch"], "arch_kwargs": t["arch_kwargs"],
                        "weights": f"{t['name']}.safetensors"})
    (tdir / "ensemble.yaml").write_text(yaml.safe_dump({"num_classes": 10, "members": members}, sort_keys=False))
    return members


def write_example(root: Path, *, quick: bool = False, log: Callable[[str], None] = print) -> Path:
    """A data root the service can run as is: digits, trained teachers, ``job.yaml`` and ``student.yaml``.

    Paths in ``job.yaml`` are relative to ``root``, as the service resolves them against its first data root."""
    root = Path(root)
    log(f"digits -> {root / 'digits'}")
    train_npz, _ = prepare_digits(root / "digits")
    epochs = 3 if quick else TEACHER_EPOCHS
    log(f"training {len(TEACHERS)} teachers ({epochs} epochs each) -> {root / 'teachers'}")
    members = make_teachers(train_npz, root / "teachers", epochs=epochs)
    job = {
        "teachers": {"num_classes": 10, "members": [{**m, "weights": f"teachers/{m['weights']}"} for m in members]},
        "data": {"kind": "arrays", "path": "digits/train.npz"},
        "combine": "geometric",
        "dtype": "float16",
        "chunk_rows": 256,
    }
    (root / "job.yaml").write_text("# submit with: darkstore submit job.yaml --wait (paths relative to the data root)\n"
                                   + yaml.safe_dump(job, sort_keys=False))
    (root / "student.yaml").write_text(yaml.safe_dump(STUDENT, sort_keys=False))
    return root / "job.yaml"


@dataclass
class DemoResult:
    out: Path
    rows: list[dict]
    table: str


def run_demo(out: Path, *, seeds: int = 3, log: Callable[[str], None] = print, quick: bool = False) -> DemoResult:
    from student_trainer.train import Sources, TrainConfig, train
    from teacher_service.generate import generate
    from teacher_service.spec import EnsembleSpec, JobSpec
    from storage import open_store

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out)
    teacher_epochs = 3 if quick else TEACHER_EPOCHS
    student_epochs = 3 if quick else STUDENT_EPOCHS

    log(f"[1/4] digits -> {out / 'data'}")
    train_npz, test_npz = prepare_digits(out / "data")

    log(f"[2/4] training {len(TEACHERS)} teachers ({teacher_epochs} epochs each)")
    tdir = out / "teachers"
    make_teachers(train_npz, tdir, epochs=teacher_epochs)
    ensemble = EnsembleSpec.from_file(tdir / "ensemble.yaml")

    log("[3/4] running the ensemble once over the transfer set and the test set")
    stores = {}
    for split, npz in (("train", train_npz), ("test", test_npz)):
        spec = JobSpec(teachers=ensemble, data={"kind": "arrays", "path": str(npz)}, combine="geometric",
                       dtype="float16", chunk_rows=256)
        stores[split] = generate(spec, out / "stores" / split).path
    k = VIEWS["views"]
    spec = JobSpec(teachers=ensemble, data={"kind": "arrays", "path": str(train_npz)}, combine="geometric",
                   dtype="float16", chunk_rows=256, augment=VIEWS)
    stores["views"] = generate(spec, out / "stores" / "train_views").path
    log(f"      and {k} recorded views of each transfer sample ({describe_views()}) -> {stores['views']}")

    log(f"[4/4] training the student {STUDENT['arch']}{STUDENT['arch_kwargs'].get('hidden', '')} "
        f"baseline (α=0), distilled (α={ALPHA}, T={TEMPERATURE:g}), and on the views with stale and with "
        f"matched targets, over {seeds} seeds")
    results: dict[str, list[dict]] = {"baseline": [], "distilled": [], "stale": [], "views": []}
    n_params = 0
    for seed in range(seeds):
        for kind, alpha in (("baseline", 0.0), ("distilled", ALPHA), ("stale", ALPHA), ("views", ALPHA)):
            on_views = kind in ("views", "stale")
            cfg = TrainConfig(student=ModelSpec(**STUDENT), temperature=TEMPERATURE, alpha=alpha,
                              epochs=max(1, student_epochs // k) if on_views else student_epochs,
                              batch_size=64, lr=2e-3, weight_decay=1e-4, seed=seed,
                              view_targets="clean" if kind == "stale" else "matched")
            store = stores["views" if on_views else "train"]
            r = train(cfg, Sources(store, eval_store=stores["test"]), out / "runs" / f"{kind}_seed{seed}",
                      overwrite=True)  # the demo makes its whole folder anew
            results[kind].append(r.final)
            n_params = r.num_params
            log(f"      {kind:9s} seed {seed}: accuracy {r.final['accuracy']:.4f}")

    test = open_store(stores["test"])
    acc = test.accuracy()
    n_test = int(acc["labeled_rows"])
    rows = []
    for t in test.meta.teachers:
        rows.append(_row(f"teacher {t.name}", [acc[t.name]], n_test, t.num_params))
    rows.append(_row(f"ensemble ({test.meta.combine} mean of {len(test.meta.teachers)})", [acc["ensemble"]], n_test,
                     sum(t.num_params for t in test.meta.teachers)))
    rows.append(_row("student, hard labels only", [r["accuracy"] for r in results["baseline"]], n_test, n_params))
    rows.append(_row(f"student, distilled (α={ALPHA}, T={TEMPERATURE:g})",
                     [r["accuracy"] for r in results["distilled"]], n_test, n_params))
    rows.append(_row("student, the same views with their samples' clean targets (stale; same steps)",
                     [r["accuracy"] for r in results["stale"]], n_test, n_params))
    rows.append(_row(f"student, distilled on {k} recorded views ({describe_views()}; same steps)",
                     [r["accuracy"] for r in results["views"]], n_test, n_params))
    comparisons = [compare(a, b, results, n_test) for a, b in COMPARISONS] if seeds > 1 else []
    table = render_table(rows, n_test, seeds) + render_comparisons(comparisons)
    (out / "results.json").write_text(json.dumps({"rows": rows, "runs": results, "comparisons": comparisons},
                                                 indent=2))
    (out / "results.md").write_text(table + "\n")
    write_alpha_grid(out / "alpha_grid.yaml", student_epochs)
    return DemoResult(out, rows, table)


def write_alpha_grid(path: Path, epochs: int = STUDENT_EPOCHS) -> Path:
    """The classic experiment on the demo's stores: α ∈ {0, 0.5, 1}, 4 seeds each (`darkstore sweep --grid`)."""
    doc = {
        "store": "stores/train",
        "eval_store": "stores/test",
        "base": {"student": STUDENT, "temperature": TEMPERATURE, "epochs": epochs, "batch_size": 64, "lr": 2e-3,
                 "weight_decay": 1e-4},
        "grid": {"alpha": [0.0, 0.5, 1.0], "seed": [0, 1, 2, 3]},
    }
    path.write_text("# darkstore sweep --grid " + path.name + " --out sweep   (paths relative to this file)\n"
                    + yaml.safe_dump(doc, sort_keys=False))
    return path


def describe_views() -> str:
    ops = ", ".join(o["op"] + "(" + ", ".join(f"{k}={v}" for k, v in o.items() if k != "op") + ")"
                    for o in VIEWS["ops"])
    return f"view 0 clean, then {ops}"


def _row(name: str, accs: list[float], n: int, params: int) -> dict:
    errs = [round((1 - a) * n) for a in accs]
    return {
        "model": name,
        "accuracy_mean": statistics.fmean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "errors_mean": statistics.fmean(errs),
        "errors_std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
        "params": params,
        "runs": len(accs),
    }


def compare(arm: str, other: str, results: dict[str, list[dict]], n: int) -> dict:
    """``arm`` − ``other`` in test errors: the difference of the seed means, its standard error, and a verdict
    (within the seed spread when |Δ| ≤ SPREAD_SE standard errors)."""
    ea = [round((1 - r["accuracy"]) * n) for r in results[arm]]
    eb = [round((1 - r["accuracy"]) * n) for r in results[other]]
    diff = statistics.fmean(ea) - statistics.fmean(eb)
    se = (statistics.variance(ea) / len(ea) + statistics.variance(eb) / len(eb)) ** 0.5
    direction = "fewer" if diff < 0 else "more"
    if diff == 0 or abs(diff) <= SPREAD_SE * se:
        verdict = "within the seed spread"
    elif se == 0:
        verdict = f"{direction} errors with no spread over seeds"
    else:
        verdict = f"{direction} errors, beyond the seed spread ({abs(diff) / se:.1f} SE)"
    return {"arm": arm, "other": other, "errors_diff": diff, "errors_se": se, "verdict": verdict,
            "within_spread": verdict == "within the seed spread"}


def render_comparisons(comparisons: list[dict]) -> str:
    if not comparisons:
        return ""
    width = max(len(f"{c['arm']} − {c['other']}") for c in comparisons)
    lines = [f"\ndifferences in test errors (mean over seeds ± standard error; within the seed spread when "
             f"|Δ| ≤ {SPREAD_SE:g} SE):"]
    for c in comparisons:
        name = f"{c['arm']} − {c['other']}"
        lines.append(f"  {name:<{width}}  {c['errors_diff']:+5.1f} ± {c['errors_se']:.1f}  {c['verdict']}")
    lines.append("the arms' order within the spread differs between machines and seeds: "
                 "bench/quality.py compares recipes with 5 seeds")
    return "\n".join(lines)


def render_table(rows: list[dict], n_test: int, seeds: int) -> str:
    lines = [
        f"| model | test accuracy | test errors (of {n_test}) | parameters |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["runs"] > 1:
            acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} %"
            err = f"{r['errors_mean']:.1f} ± {r['errors_std']:.1f}"
        else:
            acc, err = f"{100 * r['accuracy_mean']:.2f} %", f"{r['errors_mean']:.0f}"
        lines.append(f"| {r['model']} | {acc} | {err} | {r['params']:,} |")
    lines.append(f"\nstudents: mean ± std over {seeds} seeds")
    return "\n".join(lines)
