"""Memory stays bounded as the transfer set grows: peak RSS of generation and of training at N and
10·N rows. Each measurement runs in a fresh child process (peak RSS only grows within a process);
inputs are computed from their index, so no input data is held and RSS measures darkstore itself.

    ./dev bench memory [--rows 20000]

Last line: ``rss_growth_10x: <worst peak(10N) / peak(N)>`` (target ≤ 1.1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, peak_rss_mib, teachers

HERE = Path(__file__).resolve().parent


def child(phase: str, rows: int, tmp: Path, classes: int) -> None:
    import numpy as np

    from storage import open_store
    from student_trainer.train import Sources, TrainConfig, train
    from teacher_service.generate import generate
    from teacher_service.spec import JobSpec

    store = tmp / f"store-{rows}"
    if phase == "generate":
        members = teachers(tmp / "t", 2, classes, "mlp", in_features=768, hidden=[64])
        spec = JobSpec.model_validate({
            "teachers": {"num_classes": classes, "members": members},
            "data": {"kind": "factory", "factory": "_common:procedural", "kwargs": {"n": rows, "classes": classes}},
            "chunk_rows": 1024})
        generate(spec, store, allow_code=True, batch_size=512)
    else:
        cfg = TrainConfig(student={"arch": "mlp", "arch_kwargs": {"in_features": 768, "hidden": [256]}}, epochs=1,
                          batch_size=256, holdout=0.0)
        train(cfg, Sources(store, allow_code=True), tmp / f'run-{rows}')
        assert open_store(store).complete
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "rows": int(np.int64(rows))}))


def measure(phase: str, rows: int, tmp: Path, classes: int) -> float:
    r = subprocess.run([sys.executable, __file__, "--child", phase, "--rows", str(rows), "--tmp", str(tmp),
                        "--classes", str(classes)], capture_output=True, text=True, cwd=HERE)
    if r.returncode:
        raise SystemExit(f"{phase} at {rows} rows failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--child")
    ap.add_argument("--tmp")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.rows, Path(a.tmp), a.classes)
        return
    tmp = Path(tempfile.mkdtemp(prefix="darkstore-bench-"))
    try:
        peaks = {}
        for rows in (a.rows, 10 * a.rows):
            for phase in ("generate", "train"):
                peaks[phase, rows] = measure(phase, rows, tmp, a.classes)
        print(f"machine: {machine()}")
        print(f"{a.classes} classes, float16 stores in chunks of 1024 rows; teachers 2 x mlp(768->64), "
              f"student mlp(768->256), 1 epoch")
        growth = {}
        for phase in ("generate", "train"):
            small, big = peaks[phase, a.rows], peaks[phase, 10 * a.rows]
            growth[phase] = big / small
            print(f"{phase:9s} peak RSS: {small:8.1f} MiB at {a.rows} rows, {big:8.1f} MiB at {10 * a.rows} rows "
                  f"(x{growth[phase]:.3f})")
        print(f"rss_growth_10x: {max(growth.values()):.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
