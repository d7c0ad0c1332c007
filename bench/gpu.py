"""The generation and training benchmarks on a GPU, with absolute throughput.

    ./dev bench gpu            # on a machine with a CUDA GPU

Runs bench/generate.py (teachers on the GPU; bound = forward only) and bench/train.py (student on
the GPU; bound = targets preloaded) with GPU-sized defaults, and prints rows per second and the
fraction of each bound. Last line: ``gpu_generate_rows_per_second: <rows/s>``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{script} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=4)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here)")
    gen = run("generate.py", "--device", "cuda", "--rows", str(a.rows), "--width", str(a.width),
              "--num-workers", str(a.num_workers), "--batch-size", "1024", "--classes", "1000")
    threads = run("generate.py", "--device", "cuda", "--rows", str(a.rows), "--width", str(a.width),
                  "--num-workers", str(a.num_workers), "--batch-size", "1024", "--classes", "1000",
                  "--writer-mode", "threads")
    tr = run("train.py", "--device", "cuda", "--rows", str(a.rows), "--num-workers", str(a.num_workers),
             "--classes", "1000", "--chunk-rows", "1024", "--batch-size", "1024", "--hidden", "2048")
    print(gen.rstrip())
    print("-- the same with writer threads instead of writer processes:")
    print("\n".join(ln for ln in threads.rstrip().splitlines() if ln.startswith(("full job", "median", "generate_eff"))))
    print(tr.rstrip())
    full = float(re.search(r"full job:\s+[\d.]+ s\s+\(([\d,]+) rows/s\)", gen).group(1).replace(",", ""))
    print(f"gpu_generate_rows_per_second: {full:.0f}")


if __name__ == "__main__":
    main()
