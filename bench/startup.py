"""What a `darkstore` process costs before and beyond its work: whole processes of `darkstore train` on a tiny
student against `python -c "import torch"`, and where the difference goes.

    ./dev bench startup [--rounds 7]

Set-up (untimed): a store of 256 rows × 10 classes from one tiny MLP teacher. Then, alternated in each of
``--rounds`` rounds, whole processes, wall time from spawn to exit:

- ``python -c "import torch"``: the floor every torch program pays;
- ``torch + optimiser``: import torch, one ``AdamW`` step on one parameter: the floor of every torch
  *training* program, as ``torch.optim`` imports ``torch._dynamo`` at its first call;
- ``darkstore --help``: the command line alone (no torch);
- ``darkstore inspect STORE``: the store opened and summarised;
- ``darkstore train`` of an MLP (64 → 16 → 10) for one epoch of the 256 rows: about a millisecond of work.

Printed: the median of each and the median of the paired ratios to ``import torch`` with their range; then,
in one process, the import times of the modules ``train`` loads (``python -X importtime``) above 20 ms.
Last lines: ``train_startup_vs_torch_and_optimiser`` and ``train_startup_vs_import_torch``, medians of paired
ratios.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _common import images, machine, paired, teachers

DARKSTORE = [sys.executable, "-m", "darkstore_app.cli"]
#: the floor of any torch training program: torch.optim imports torch._dynamo at its first call
OPTIMISER = ("import torch; p = torch.zeros(1, requires_grad=True); o = torch.optim.AdamW([p]); "
             "p.sum().backward(); o.step()")


def setup(work: Path) -> Path:
    from teacher_service.generate import generate
    from teacher_service.spec import JobSpec

    data = images(work / "x.npz", 256, shape=(1, 8, 8), classes=10)
    members = teachers(work / "t", 1, 10, "mlp", in_features=64, hidden=[16])
    spec = JobSpec.model_validate({"teachers": {"num_classes": 10, "members": members},
                                   "data": {"kind": "arrays", "path": str(data)}})
    return Path(generate(spec, work / "store").path)


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return took


def commands(work: Path, store: Path) -> dict[str, Callable[[], list[str]]]:
    runs = iter(range(1 << 30))

    def train() -> list[str]:
        out = work / f"run{next(runs)}"
        shutil.rmtree(out, ignore_errors=True)
        return [*DARKSTORE, "train", "--store", str(store), "--out", str(out), "--student", "mlp", "--arch-kwargs",
                '{"in_features": 64, "hidden": [16]}', "--epochs", "1", "--holdout", "0"]

    return {
        "import torch": lambda: [sys.executable, "-c", "import torch"],
        "torch + optimiser": lambda: [sys.executable, "-c", OPTIMISER],
        "darkstore --help": lambda: [*DARKSTORE, "--help"],
        "darkstore inspect": lambda: [*DARKSTORE, "inspect", str(store)],
        "darkstore train": train,
    }


def imports(work: Path, store: Path) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the top-level imports above 20 ms in one `darkstore train` process."""
    cmd = commands(work, store)["darkstore train"]()
    r = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=work, capture_output=True, text=True)
    out = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if m and len(m.group(2)) <= 2 and int(m.group(1)) > 20_000:
            out.append((int(m.group(1)) / 1e6, m.group(3)))
    return sorted(out, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="darkstore-bench-"))
    try:
        store = setup(work)
        cmds = commands(work, store)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for f in cmds.values():  # warm the page cache
            timed(f(), work)
        for r in range(a.rounds):
            order = list(cmds.items())
            for name, f in order if r % 2 == 0 else order[::-1]:
                times[name].append(timed(f(), work))
        base = times["import torch"]
        print(f"\nwhole processes, {a.rounds} alternating rounds (median seconds; paired ratio to import torch):")
        for name, ts in times.items():
            print(f"  {name:<20} {statistics.median(ts):6.2f} s   {paired(ts, base)}")
        print("\nimports of one `darkstore train` (cumulative, above 20 ms, top level):")
        for s, mod in imports(work, store)[:15]:
            print(f"  {s:6.3f} s  {mod}")
        floor = statistics.median(t / b for t, b in zip(times["darkstore train"], times["torch + optimiser"]))
        print(f"\ntrain_startup_vs_torch_and_optimiser: {floor:.2f}")
        m = statistics.median(t / b for t, b in zip(times["darkstore train"], base))
        print(f"train_startup_vs_import_torch: {m:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
