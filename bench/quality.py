"""Does distillation through darkstore work? Students on real digits, darkstore's CLI vs plain PyTorch.

    ./dev bench quality [--seeds 5] [--epochs 96] [--views 8] [--out DIR]

Data: scikit-learn's bundled handwritten digits (1797 real 8x8 images), split 2/3 transfer set,
1/3 test set (stratified, fixed seed). The bench trains three small CNN teachers on the transfer
set (plain PyTorch, light shift augmentation), then trains one small MLP student recipe
(64-256-10, AdamW lr 2e-3, weight decay 1e-4, cosine, batch 64, T = 4, α = 0.9) in arms:

=========================  ==============================================================
arm                        what the student learns from
=========================  ==============================================================
hard                       hard labels only (α = 0), the clean transfer set
kd                         the ensemble's geometric-mean soft targets on the clean set
views                      K recorded views per sample (view 0 clean, then whole-pixel
                           shifts of up to ±1 px), one random view of each sample per
                           epoch, each view with the targets the teachers gave *it*
written-out views          exactly the same views written out as a plain dataset of N·K
                           images and distilled as a plain store, for E/K epochs (the
                           same number of steps)
mixup views                4 recorded views (view 0 clean, then mixup with λ ~ Beta(0.2,
                           0.2)), one per sample per epoch, hard term λ-mixed
=========================  ==============================================================

Every darkstore arm runs what a user runs: ``darkstore generate`` makes the stores and
``darkstore sweep`` trains the seeds (whole processes). The plain-PyTorch reference repeats
hard, kd and both views arms with no darkstore code at all: its own teacher forward passes, geometric
mean, shifts, loss, loop and schedule, over the same teachers and the same split.

It prints test accuracy (mean ± std over seeds), the gap closed between the hard-label student
and the ensemble — (student − hard) / (ensemble − hard) — and, for each arm, darkstore minus the
plain reference with its standard error (within noise when |Δ| ≤ 2 SE), and views minus
written-out views.
"""

from __future__ import annotations

import argparse
import json
import math
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

from _common import ROOT, machine  # noqa: F401  (puts the repository root first on sys.path)

CLASSES = 10
TEACHERS = [  # darkstore's built-in small_cnn, trained here in plain PyTorch
    {"name": "cnn_a", "width": 32, "seed": 1},
    {"name": "cnn_b", "width": 24, "seed": 2},
    {"name": "cnn_c", "width": 32, "seed": 3},
]
RECIPE = {"batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "temperature": 4.0, "alpha": 0.9}
SHIFT = 1  # recorded views: whole-pixel shifts of −SHIFT..SHIFT in x and y, zero fill
MIXUP_VIEWS, MIXUP_ALPHA = 4, 0.2  # the mixup views: view 0 clean, then mixup with λ ~ Beta(0.2, 0.2)


# --- data and teachers (shared by both sides) ---------------------------------------------
def split_digits(out: Path) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=1 / 3, random_state=0,
                                          stratify=d.target)
    names = np.array([str(i) for i in range(CLASSES)])
    np.savez(out / "train.npz", x=xtr, y=ytr, class_names=names)
    np.savez(out / "test.npz", x=xte, y=yte, class_names=names)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


def train_teachers(d: dict[str, np.ndarray], out: Path, epochs: int,
                   teachers: list[dict] = TEACHERS) -> list[torch.nn.Module]:
    """Plain supervised CNNs (cross-entropy, ±1 px random rolls), saved as safetensors + ensemble.yaml."""
    from safetensors.torch import save_file

    from darkstore.models import SmallCNN  # the architecture only, so that `generate` can rebuild it

    x, y = torch.from_numpy(d["xtr"]), torch.from_numpy(d["ytr"])
    models, members = [], []
    for t in teachers:
        torch.manual_seed(t["seed"])
        g = torch.Generator().manual_seed(t["seed"])
        m = SmallCNN(CLASSES, in_channels=1, width=t["width"])
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-4)
        steps = epochs * math.ceil(len(x) / 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        for _ in range(epochs):
            m.train()
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), 64):
                idx = perm[s:s + 64]
                dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
                loss = F.cross_entropy(m(torch.roll(x[idx], shifts=(dx, dy), dims=(2, 3))), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        m.eval()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / f"{t['name']}.safetensors"))
        members.append({"name": t["name"], "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": t["width"]},
                        "weights": str(out / f"{t['name']}.safetensors")})
        models.append(m)
    (out / "ensemble.yaml").write_text(yaml.safe_dump({"num_classes": CLASSES, "members": members}, sort_keys=False))
    return models


# --- the plain-PyTorch reference (no darkstore code below this line until `darkstore arms`) -----
@torch.no_grad()
def ensemble_logits(models: list[torch.nn.Module], x: np.ndarray) -> torch.Tensor:
    """Geometric mean of the members' distributions, as logits: the mean of their logits."""
    xt = torch.from_numpy(x)
    return torch.stack([m(xt) for m in models]).mean(dim=0)


def shift(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Whole-pixel translation with zero fill (x [C, H, W]); positive dx moves right, dy down."""
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
        x[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def plain_views(x: np.ndarray, k: int, seed: int = 1234) -> np.ndarray:
    """[N, K, C, H, W]: view 0 clean, views 1..K−1 shifted by uniform whole pixels in −SHIFT..SHIFT."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(x), k, *x.shape[1:]), dtype=x.dtype)
    for i in range(len(x)):
        out[i, 0] = x[i]
        for v in range(1, k):
            dx, dy = (int(s) for s in rng.integers(-SHIFT, SHIFT + 1, 2))
            out[i, v] = shift(x[i], dx, dy)
    return out


def plain_mixup_views(x: np.ndarray, k: int, seed: int = 4321) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View 0 clean, views 1..K−1 mixup with a random partner, λ ~ Beta(α, α): (views, partner, λ) [N, K]."""
    rng = np.random.default_rng(seed)
    n = len(x)
    partner = np.where(np.arange(k) == 0, -1, rng.integers(0, n, (n, k)))
    lam = np.where(np.arange(k) == 0, 1.0, rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, (n, k))).astype(np.float32)
    views = lam[..., None, None, None] * x[:, None] + (1 - lam[..., None, None, None]) * x[np.maximum(partner, 0)]
    return views.astype(np.float32), partner, lam


def plain_student(seed: int, x: np.ndarray, y: np.ndarray, xte: np.ndarray, yte: np.ndarray, *, epochs: int,
                  alpha: float, targets: torch.Tensor | None, views: np.ndarray | None = None,
                  mix: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Hinton's recipe written out: α·T²·KL(p‖q) + (1−α)·CE, AdamW, cosine per step; test accuracy.

    With ``views`` ([N, K, ...]) and ``targets`` [N, K, C], each epoch draws one random view per sample;
    ``mix`` (partner, λ) [N, K] makes the hard term λ·CE(y) + (1 − λ)·CE(y_partner)."""
    r = RECIPE
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].size, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    n, bs, t = len(x), r["batch_size"], r["temperature"]
    total = epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    vt = torch.from_numpy(views) if views is not None else None
    for _ in range(epochs):
        model.train()
        pick = torch.randint(0, vt.shape[1], (n,), generator=g) if vt is not None else None
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            xb = vt[idx, pick[idx]] if vt is not None else xt[idx]
            out = model(xb)
            if mix is not None:
                part, lam = (torch.from_numpy(m)[idx, pick[idx]] for m in mix)
                ce = F.cross_entropy(out, yt[idx], reduction="none")
                ce2 = F.cross_entropy(out, yt[part.clamp(min=0)], reduction="none")
                hard = torch.where(part >= 0, lam * ce + (1 - lam) * ce2, ce).mean()
            else:
                hard = F.cross_entropy(out, yt[idx])
            loss = (1 - alpha) * hard if alpha < 1 else 0.0
            if alpha > 0:
                tb = targets[idx, pick[idx]] if vt is not None else targets[idx]
                kl = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(tb / t, -1), reduction="batchmean",
                              log_target=True)
                loss = loss + alpha * t * t * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(xte)).argmax(-1).numpy() == yte).mean())


def plain_arms(d, models, *, seeds, epochs, k, log) -> dict[str, list[float]]:
    tr_logits = ensemble_logits(models, d["xtr"])
    views = plain_views(d["xtr"], k)
    n = len(views)
    v_logits = ensemble_logits(models, views.reshape(n * k, *views.shape[2:])).reshape(n, k, CLASSES)
    mviews, partner, lam = plain_mixup_views(d["xtr"], MIXUP_VIEWS)
    m_logits = ensemble_logits(models, mviews.reshape(n * MIXUP_VIEWS, *views.shape[2:])).reshape(n, MIXUP_VIEWS,
                                                                                                 CLASSES)
    out: dict[str, list[float]] = {"hard": [], "kd": [], "views": [], "mixup views": []}
    for seed in range(seeds):
        common = dict(x=d["xtr"], y=d["ytr"], xte=d["xte"], yte=d["yte"], epochs=epochs)
        a = RECIPE["alpha"]
        out["hard"].append(plain_student(seed, alpha=0.0, targets=None, **common))
        out["kd"].append(plain_student(seed, alpha=a, targets=tr_logits, **common))
        out["views"].append(plain_student(seed, alpha=a, targets=v_logits, views=views, **common))
        out["mixup views"].append(plain_student(seed, alpha=a, targets=m_logits, views=mviews, mix=(partner, lam),
                                                **common))
        log(f"  plain seed {seed}: " + ", ".join(f"{a} {100 * v[-1]:.2f} %" for a, v in out.items()))
    return out


# --- darkstore arms: the CLI, as a user runs it --------------------------------------------
def cli(*args: str, cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"darkstore {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def write_views_out(work: Path, k: int) -> Path:
    """The views store's exact views (same recipe, same parameters) written out as a plain .npz."""
    from darkstore.data import parse_data_spec
    from darkstore.transfer import open_transfer_set
    from darkstore.views import AugmentSpec, ViewSet
    from storage.schema import RowLayout

    aug = AugmentSpec.model_validate(yaml.safe_load((work / "views.yaml").read_text()))
    base = open_transfer_set(parse_data_spec(str(work / "train.npz")))
    vs = ViewSet(base, aug, RowLayout(aug.views))
    rows = np.arange(len(vs))
    x, y = vs.get_batch(rows)
    np.savez(work / "views_out.npz", x=x.numpy(), y=y.numpy(), class_names=np.array([str(i) for i in range(CLASSES)]))
    return work / "views_out.npz"


def darkstore_arms(work: Path, *, seeds: int, epochs: int, k: int, parallel: int, log) -> dict[str, list[float]]:
    (work / "views.yaml").write_text(yaml.safe_dump(
        {"views": k, "ops": [{"op": "affine", "shift": SHIFT}], "clean_view0": True, "seed": 0}))
    (work / "mixup.yaml").write_text(yaml.safe_dump(
        {"views": MIXUP_VIEWS, "ops": [{"op": "mixup", "alpha": MIXUP_ALPHA}], "clean_view0": True, "seed": 0}))
    write_views_out(work, k)
    gen = ["generate", "--teachers", "ensemble.yaml", "--combine", "geometric", "--chunk-rows", "256"]
    cli(*gen, "--data", "train.npz", "--out", "stores/train", cwd=work)
    cli(*gen, "--data", "test.npz", "--out", "stores/test", cwd=work)
    cli(*gen, "--data", "train.npz", "--augment", "views.yaml", "--out", "stores/views", cwd=work)
    cli(*gen, "--data", "views_out.npz", "--out", "stores/views_out", cwd=work)
    cli(*gen, "--data", "train.npz", "--augment", "mixup.yaml", "--out", "stores/mixup", cwd=work)
    base = {"student": {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [256]}},
            "batch_size": RECIPE["batch_size"], "lr": RECIPE["lr"], "weight_decay": RECIPE["weight_decay"],
            "temperature": RECIPE["temperature"], "schedule": "cosine"}
    arms = {
        "hard": ("stores/train", {"alpha": 0.0, "epochs": epochs}),
        "kd": ("stores/train", {"alpha": RECIPE["alpha"], "epochs": epochs}),
        "views": ("stores/views", {"alpha": RECIPE["alpha"], "epochs": epochs, "views_per_epoch": 1}),
        "written-out views": ("stores/views_out", {"alpha": RECIPE["alpha"], "epochs": epochs // k}),
        "mixup views": ("stores/mixup", {"alpha": RECIPE["alpha"], "epochs": epochs, "views_per_epoch": 1}),
    }
    out: dict[str, list[float]] = {}
    for arm, (store, opts) in arms.items():
        grid = {"store": store, "eval_store": "stores/test", "base": {**base, **opts},
                "grid": {"seed": list(range(seeds))}}
        out[arm] = [r["accuracy"] for r in sweep_runs(work, arm, grid, parallel, log)]
    return out


def sweep_runs(work: Path, arm: str, grid: dict, parallel: int, log) -> list[dict]:
    """``darkstore sweep`` one arm's grid in ``work`` (whole processes); its finished runs, by seed."""
    name = "".join(ch if ch.isalnum() else "_" for ch in arm)
    (work / f"{name}.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    t0 = time.perf_counter()
    cli("sweep", "--grid", f"{name}.yaml", "--out", f"sweeps/{name}", "--parallel", str(parallel),
        "--threads", "1", cwd=work)
    runs = json.loads((work / "sweeps" / name / "results.json").read_text())["runs"]
    log(f"  {arm}: {len(runs)} students in {time.perf_counter() - t0:.0f} s")
    return sorted(runs, key=lambda r: r["seed"])


# --- report ---------------------------------------------------------------------------------
def ms(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def pct(v: list[float]) -> str:
    m, s = ms(v)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def diff(a: list[float], b: list[float]) -> tuple[float, float]:
    (ma, sa), (mb, sb) = ms(a), ms(b)
    return ma - mb, math.sqrt(sa * sa / len(a) + sb * sb / len(b))


def report(ens: float, teachers: list[float], ours: dict, plain: dict, n_test: int, seeds: int) -> str:
    hard = ms(ours["hard"])[0]
    lines = [f"test set: {n_test} digits; students: mean ± std over {seeds} seeds", "",
             "| model | darkstore (CLI) | plain PyTorch | gap closed (darkstore) | darkstore − plain |",
             "|---|---|---|---|---|"]
    for name, acc in zip([t["name"] for t in TEACHERS], teachers):
        lines.append(f"| teacher {name} | {100 * acc:.2f} % | | | |")
    lines.append(f"| ensemble (geometric mean) | {100 * ens:.2f} % | | 100 % | |")
    for arm in ("hard", "kd", "views", "written-out views", "mixup views"):
        mine = ours[arm]
        gap = (ms(mine)[0] - hard) / (ens - hard) if ens != hard else float("nan")
        if arm in plain:
            d, se = diff(mine, plain[arm])
            verdict = "within noise" if abs(d) <= 2 * se + 1e-12 else "OUTSIDE noise"
            ref, cmp = f"{pct(plain[arm])} %", f"{100 * d:+.2f} ± {100 * se:.2f} pt ({verdict})"
        else:
            ref, cmp = "", ""
        lines.append(f"| student, {arm} | {pct(mine)} % | {ref} | {100 * gap:.0f} % | {cmp} |")
    d, se = diff(ours["views"], ours["written-out views"])
    lines += ["", "both sides seed the student's initialisation alike (torch.manual_seed(seed) before building it), so "
              "seeds pair up; the standard errors treat them as independent, which is conservative", "",
              f"views − written-out views (darkstore, same views and steps): {100 * d:+.2f} ± {100 * se:.2f} pt "
              f"({'views better' if d > 2 * se else 'within noise' if d >= -2 * se else 'views WORSE'})"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=96, help="student epochs on the clean set (a multiple of --views)")
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=2, help="sweep processes at once")
    ap.add_argument("--out", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    a = ap.parse_args()
    if a.epochs % a.views:
        ap.error("--epochs must be a multiple of --views (the written-out arm runs epochs / views epochs)")
    log = lambda s: print(s, flush=True)  # noqa: E731
    tmp = None
    if a.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="darkstore-quality-")
        work = Path(tmp.name)
    else:
        work = a.out.resolve()
        work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"machine: {machine()}")
    log(f"[1/4] digits and {len(TEACHERS)} teachers ({a.teacher_epochs} epochs) -> {work}")
    torch.set_num_threads(2)
    d = split_digits(work)
    models = train_teachers(d, work, a.teacher_epochs)
    te_logits = ensemble_logits(models, d["xte"])
    with torch.no_grad():
        teachers = [float((m(torch.from_numpy(d["xte"])).argmax(-1).numpy() == d["yte"]).mean()) for m in models]
    ens = float((te_logits.argmax(-1).numpy() == d["yte"]).mean())
    log(f"[2/4] darkstore: generate 5 stores, then sweep {a.seeds} seeds for each arm")
    ours = darkstore_arms(work, seeds=a.seeds, epochs=a.epochs, k=a.views, parallel=a.parallel, log=log)
    log(f"[3/4] plain PyTorch reference, {a.seeds} seeds")
    torch.set_num_threads(1)
    plain = plain_arms(d, models, seeds=a.seeds, epochs=a.epochs, k=a.views, log=log)
    log(f"[4/4] done in {time.perf_counter() - t0:.0f} s\n")
    text = report(ens, teachers, ours, plain, len(d["yte"]), a.seeds)
    print(text)
    (work / "quality.md").write_text(text + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
