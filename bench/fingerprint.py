"""Start-up cost of `darkstore train` as the transfer set grows: with the fingerprint manifest, and without.

    ./dev bench fingerprint [--sizes 2000,20000 --file-kb 110 --rounds 3]

For each size N, an image folder of N files in 100 class folders: each a real 32x32 JPEG padded to
``--file-kb`` KB (ImageNet's files average about 110 KB), dated an hour ago. One `darkstore generate --shard
0/K` per folder computes only the store's first chunk (1,024 rows), so every `train` below trains on the same
1,024 rows whatever N is: what grows with N is only what start-up does with the whole transfer set (list
it, fingerprint it). That generate is each set's *first run*: it hashes every file and writes the manifest.

Then, alternated in each round (whole CLI processes, `train --allow-incomplete --epochs 1`):

- **manifest**: the default (`--verify-data quick`): list and stat the files, take unchanged files' digests
  from the manifest, re-read 32 of them;
- **full**: `--verify-data full`: hash every file, as every process did before the manifest existed.

And in process, the fingerprint alone (`open_transfer_set(...).fingerprint`) both ways. Printed: median
seconds, the paired ratios (20k over 2k for each variant: flat is 1.0; full over manifest at each size), and
the per-file costs extrapolated to ImageNet's 1,281,167 files (140 GB). All files sit in the page cache after
the first read, so "full" here is sha256's speed, not a disk's: on a network file system the first read (and
every full check) costs far more, and the manifest's stats somewhat more. Last line:
``manifest_large_over_small: <median ratio>``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import ROOT, machine, paired, teachers

from darkstore.transfer import open_transfer_set
from darkstore.fingerprint import FingerprintPolicy

IMAGENET_FILES, IMAGENET_BYTES = 1_281_167, 140e9
CHUNK = 1024


def make_folder(root: Path, n: int, file_kb: int, classes: int = 100) -> Path:
    rng = np.random.default_rng(n)
    base = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(base, format="JPEG", quality=90)
    jpeg = base.getvalue()
    pad = max(0, file_kb * 1024 - len(jpeg))
    when = time.time() - 3600
    for i in range(n):
        d = root / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{i:07d}.jpg"
        f.write_bytes(jpeg + rng.bytes(pad))  # bytes after the JPEG's end marker: decoders stop before them
        os.utime(f, (when, when))
    return root


def cli(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"darkstore {' '.join(args[:1])} failed:\n{p.stderr[-3000:]}")
    return took


def in_process(root: Path, policy: FingerprintPolicy) -> float:
    t0 = time.perf_counter()
    open_transfer_set({"kind": "image_folder", "root": str(root)}, fingerprints=policy).fingerprint  # noqa: B018
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--file-kb", type=int, default=110)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="where the folders go (default: a temporary dir)")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"# fingerprint start-up bench — {machine()}")
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DARKSTORE_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "2"}
        ens = work / "ensemble.yaml"
        import yaml

        ens.write_text(yaml.safe_dump({"members": teachers(work / "t", 1, 100, "small_cnn", in_channels=3, width=8)}))
        stores, first = {}, {}
        for n in sizes:
            t0 = time.perf_counter()
            folder = make_folder(work / f"set{n}", n, a.file_kb)
            made = time.perf_counter() - t0
            k = math.ceil(n / CHUNK)
            first[n] = cli(["generate", "--teachers", str(ens), "--data", str(folder), "--out", str(work / f"s{n}"),
                            "--chunk-rows", str(CHUNK), "--shard", f"0/{k}"], env)
            stores[n] = work / f"s{n}"
            print(f"N={n}: {n * a.file_kb / 1024**2:.2f} GB written in {made:.0f} s; first run (generate shard "
                  f"0/{k}: hashes every file, writes the manifest, computes {CHUNK} rows) {first[n]:.1f} s")

        def train(n: int, verify: str, r: int) -> float:
            return cli(["train", "--store", str(stores[n]), "--allow-incomplete", "--student", "small_cnn",
                        "--arch-kwargs", '{"in_channels": 3, "width": 4}', "--epochs", "1", "--out",
                        str(work / f"run-{n}-{verify}-{r}"), "--verify-data", verify], env)

        t = {(n, v): [] for n in sizes for v in ("quick", "full")}
        fp = {(n, v): [] for n in sizes for v in ("quick", "full")}
        cached = FingerprintPolicy(cache_dir=work / "cache" / "fingerprints")
        for r in range(a.rounds):
            for n in sizes:
                for v in (("quick", "full") if r % 2 == 0 else ("full", "quick")):
                    t[n, v].append(train(n, v, r))
                fp[n, "quick"].append(in_process(work / f"set{n}", cached))
                fp[n, "full"].append(in_process(work / f"set{n}", FingerprintPolicy()))
            print(f"round {r + 1}: " + ", ".join(f"N={n} {v} {t[n, v][-1]:.2f} s" for n in sizes
                                                 for v in ("quick", "full")), flush=True)
        med = {key: statistics.median(v) for key, v in t.items()}
        fmed = {key: statistics.median(v) for key, v in fp.items()}
        small, large = sizes[0], sizes[-1]
        print()
        print("| N files | GB | train, manifest (s) | train, --verify-data full (s) | fingerprint alone, manifest (s) "
              "| fingerprint alone, full (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n in sizes:
            print(f"| {n:,} | {n * a.file_kb / 1024**2:.2f} | {med[n, 'quick']:.2f} | {med[n, 'full']:.2f} | "
                  f"{fmed[n, 'quick']:.3f} | {fmed[n, 'full']:.3f} |")
        print()
        print(f"train with the manifest, {large:,} over {small:,} files: {paired(t[large, 'quick'], t[small, 'quick'])}")
        print(f"train with a full check,  {large:,} over {small:,} files: {paired(t[large, 'full'], t[small, 'full'])}")
        for n in sizes:
            print(f"N={n:,}: full over manifest {paired(t[n, 'full'], t[n, 'quick'])}")
        per_file_quick = (fmed[large, "quick"] - fmed[small, "quick"]) / (large - small)
        per_byte_full = (fmed[large, "full"] - fmed[small, "full"]) / ((large - small) * a.file_kb * 1024)
        print(f"extrapolated to ImageNet ({IMAGENET_FILES:,} files, {IMAGENET_BYTES / 1e9:.0f} GB), from the "
              f"in-process slopes: manifest {per_file_quick * IMAGENET_FILES:.0f} s per process; full "
              f"{per_byte_full * IMAGENET_BYTES:.0f} s per process from the page cache (hashing at "
              f"{1 / per_byte_full / 1e9:.2f} GB/s)")
        ratios = [x / y for x, y in zip(t[large, "quick"], t[small, "quick"])]
        print(f"manifest_large_over_small: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
