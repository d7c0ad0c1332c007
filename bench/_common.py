"""Shared helpers for the benchmarks: synthetic-but-real files on disk, timing, reporting."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# bench/storage.py must not shadow the `storage` package: the repository root goes first, and
# bench/ stays on the path only after it (for `_common` and the factories the benches name)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, HERE)] + [str(HERE)]

from darkstore.models import build_model, save_weights  # noqa: E402


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def images(path: Path, n: int, shape=(3, 32, 32), classes: int = 100, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((n, *shape), dtype=np.float32), y=rng.integers(0, classes, n))
    return path


def teachers(folder: Path, members: int, classes: int, arch: str, **kwargs) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(members):
        torch.manual_seed(i)
        model = build_model(arch, classes, **kwargs)
        save_weights(model, folder / f"t{i}.safetensors")
        out.append({"name": f"t{i}", "arch": arch, "arch_kwargs": kwargs, "weights": str(folder / f"t{i}.safetensors")})
    return out


def cli_seconds(work: Path, args: list[str]) -> float:
    """Wall seconds of one whole ``darkstore ARGS`` process run in ``work`` (what users run)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], cwd=work, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    return time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Run a and b alternately, so drift (thermal, caches) hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return ta, tb


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the paired ratios a[i] / b[i]: runs taken side by side, so drift hits both."""
    r = [x / y for x, y in zip(a, b)]
    return statistics.median(r), min(r), max(r)


def paired(a: list[float], b: list[float], digits: int = 2) -> str:
    """The median of the paired ratios a/b, with their range, as text."""
    m, lo, hi = paired_ratio(a, b)
    return f"{m:.{digits}f}× (range {lo:.{digits}f}–{hi:.{digits}f}, {len(a)} pairs)"


class Procedural(torch.utils.data.Dataset):
    """Samples computed from their index: no input data held in memory, so RSS measures darkstore."""

    def __init__(self, n: int, features: int = 768, classes: int = 100):
        self.n, self.features, self.num_classes = n, features, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = np.random.default_rng(int(i))
        return torch.from_numpy(g.random(self.features, dtype=np.float32)), int(i % self.num_classes)


def procedural(n: int, features: int = 768, classes: int = 100) -> Procedural:
    return Procedural(n, features, classes)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
