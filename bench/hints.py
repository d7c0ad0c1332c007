"""FitNets hints from cached teacher features: a thin, deep student hinted vs KD only vs hard labels only.

    ./dev bench hints [--seeds 5] [--epochs 150] [--hint-epochs 50] [--transfer 300] [--parallel 2]

Data: scikit-learn's bundled digits, split as in ``./dev bench quality`` (2/3 training split, 1/3 test).
Teacher: one wide ``small_cnn`` (width 64, about 112k parameters) trained here in plain PyTorch on the whole
training split. The transfer set is a stratified subset of ``--transfer`` rows of it (``--transfer 0``: all
of it), the regime distillation is for: the teacher has seen more than the student's labels show. (With
the whole split as transfer set a thin student matches the teacher from hard labels alone, so nothing
can be learned about hints.) ``darkstore generate --keep-features wide:features.9 --feature-pool 2``
stores its logits and its last conv stage (128 channels at 4x4, pooled to 2x2) once. Student: ``thin_cnn``
(default width 8, depth 6, about 5k parameters; ``--width 4 --depth 10`` is thinner and deeper, the FitNets
shape), four arms, each a ``darkstore sweep`` over seeds (whole processes):

- hard: ``--loss ce`` for E epochs;
- kd: Hinton's KD (T = 4, α = 0.9) for E epochs;
- kd, same steps: KD for H + E epochs (what the hint run costs);
- hint: FitNets — H epochs regressing ``blocks.DEPTH//2`` (the student's first block after its pool, at
  4x4 like the teacher's layer) onto the stored features through a 1x1-conv regressor, then E epochs of
  the same KD.

It prints test accuracy (mean ± std over seeds), each arm minus KD with its standard error, and the
store's bytes per row with and without the features. Last line: ``hint_minus_kd_pt: <mean difference>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine
from quality import cli, diff, ms, split_digits, sweep_runs, train_teachers

TEACHER = {"name": "wide", "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 64}}


def student(width: int, depth: int) -> dict:
    return {"arch": "thin_cnn", "arch_kwargs": {"in_channels": 1, "width": width, "depth": depth}}
KD = {"temperature": 4.0, "alpha": 0.9}
RECIPE = {"batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4, "schedule": "cosine"}


def train_teacher(d: dict[str, np.ndarray], out: Path, epochs: int) -> float:
    """The wide teacher, trained as the quality bench trains its teachers; its test accuracy."""
    (m,) = train_teachers(d, out, epochs, [{"name": "wide", "width": 64, "seed": 1}])
    with torch.no_grad():
        return float((m(torch.from_numpy(d["xte"])).argmax(-1).numpy() == d["yte"]).mean())


def arms(epochs: int, hint_epochs: int, depth: int) -> dict[str, dict]:
    return {
        "hard": {"loss": "ce", "epochs": epochs},
        "kd": {"loss": "kl", **KD, "epochs": epochs},
        "kd, same steps": {"loss": "kl", **KD, "epochs": epochs + hint_epochs},
        "hint": {"loss": "hint", **KD, "epochs": epochs, "hint_epochs": hint_epochs,
                 "student_layer": f"blocks.{depth // 2}"},
    }


def transfer_subset(work: Path, d: dict[str, np.ndarray], rows: int) -> int:
    """``transfer.npz``: a stratified subset of the training split (all of it for rows 0); its size."""
    from sklearn.model_selection import train_test_split

    x, y = d["xtr"], d["ytr"]
    if 0 < rows < len(y):
        x, _, y, _ = train_test_split(x, y, train_size=rows, random_state=0, stratify=y)
    np.savez(work / "transfer.npz", x=x, y=y, class_names=np.array([str(i) for i in range(10)]))
    return len(y)


def run(work: Path, *, seeds: int, epochs: int, hint_epochs: int, width: int, depth: int, parallel: int,
        log) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for arm, opts in arms(epochs, hint_epochs, depth).items():
        grid = {"store": "stores/train", "eval_store": "stores/test",
                "base": {"student": student(width, depth), **RECIPE, **opts}, "grid": {"seed": list(range(seeds))}}
        out[arm] = [r["accuracy"] for r in sweep_runs(work, arm, grid, parallel, log)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=150, help="KD epochs (E)")
    ap.add_argument("--hint-epochs", type=int, default=50, help="hint-stage epochs (H)")
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--transfer", type=int, default=300, help="transfer-set rows (0: the whole training split)")
    ap.add_argument("--width", type=int, default=8, help="the student's width (thin_cnn)")
    ap.add_argument("--depth", type=int, default=6, help="the student's depth; the hint guides blocks.DEPTH//2")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    a = ap.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    tmp = tempfile.TemporaryDirectory(prefix="darkstore-hints-") if a.out is None else None
    work = Path(tmp.name) if tmp else a.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"machine: {machine()}")
    torch.set_num_threads(2)
    d = split_digits(work)
    teacher = train_teacher(d, work, a.teacher_epochs)
    n_transfer = transfer_subset(work, d, a.transfer)
    log(f"[1/2] teacher {100 * teacher:.2f} % (trained on {len(d['ytr'])} digits); transfer set {n_transfer} "
        f"digits; generate the stores -> {work}")
    gen = ["generate", "--teachers", "ensemble.yaml", "--chunk-rows", "256"]
    cli(*gen, "--data", "transfer.npz", "--out", "stores/train", "--keep-features", "wide:features.9",
        "--feature-pool", "2", cwd=work)
    cli(*gen, "--data", "transfer.npz", "--out", "stores/plain", cwd=work)
    cli(*gen, "--data", "test.npz", "--out", "stores/test", cwd=work)
    from storage import open_store

    with_f, plain = (open_store(work / "stores" / s).summary() for s in ("train", "plain"))
    acc = run(work, seeds=a.seeds, epochs=a.epochs, hint_epochs=a.hint_epochs, width=a.width,
              depth=a.depth, parallel=a.parallel, log=log)
    log(f"[2/2] done in {time.perf_counter() - t0:.0f} s\n")
    kd = ms(acc["kd"])
    lines = [f"transfer set: {n_transfer} digits; test set: {len(d['yte'])}; teacher {100 * teacher:.2f} % "
             f"({TEACHER['arch']} width 64, trained on {len(d['ytr'])}); "
             f"students thin_cnn width {a.width} depth {a.depth}; mean ± std over {a.seeds} seeds; "
             f"E = {a.epochs}, H = {a.hint_epochs}", "",
             "| student | accuracy | − kd |", "|---|---|---|"]
    for arm, v in acc.items():
        m, s = ms(v)
        cell = ""
        if arm != "kd":
            d, se = diff(v, acc["kd"])
            cell = f"{100 * d:+.2f} ± {100 * se:.2f} pt"
        lines.append(f"| {arm} | {100 * m:.2f} ± {100 * s:.2f} % | {cell} |")
    f = with_f["features"][0]
    lines += ["", f"store bytes per row (uncompressed): {plain['raw_bytes_per_row']} without features, "
              f"{with_f['raw_bytes_per_row']} with {f['name']} ({' × '.join(map(str, f['shape']))}, "
              f"{f['reduction']}); on disk {plain['bytes_per_row']:.1f} vs {with_f['bytes_per_row']:.1f}"]
    text = "\n".join(lines)
    print(text)
    (work / "hints.md").write_text(text + "\n")
    print(f"\nhint_minus_kd_pt: {100 * (ms(acc['hint'])[0] - kd[0]):+.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
