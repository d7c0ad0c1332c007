"""What each other tool's format costs beside darkstore's store, on the same targets, and what export and import
cost beside the bound of reading the store.

    ./dev bench interop [--megabytes 0.5 --vocab 2048 --length 128 --steps 300 --k 32 --rounds 3]

The teachers and text of ``bench/lm.py`` (trained once, cached in ``--work``): one top-K store written by
``darkstore generate`` with float16 values (step 0) and one with the default uint8 steps of 1/16 nat. Each is
exported to every format through the CLI, as a user runs it, and the export imported back. Per store and
format: bytes on disk per position (the format's data files; the store's every field and its target fields
alone), and the whole ``darkstore targets export`` / ``import`` processes' positions per second. In-process,
rounds of the export and of a plain read of the same fields (``read_chunks`` of the target fields, the bound
an export cannot beat) are taken side by side; the median of the paired ratios (read time / export time) and
their range.

Last line: ``hf_export_efficiency: <read time / export time>``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, paired_ratio
from lm import _cli, field_bytes, job_file, setup

from interop import FORMATS, export_store
from storage import open_store
from storage.fields import target_fields


def folder_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def stores(kit: dict, work: Path, a) -> dict[str, Path]:
    out = {}
    for name, form in ((f"topk:{a.k} float16", f"topk:{a.k}/fp16"), (f"topk:{a.k} uint8 steps", f"topk:{a.k}")):
        store = work / "stores" / name.replace(":", "_").replace(" ", "_")
        if not (store / "zarr.json").is_file():
            shutil.rmtree(store, ignore_errors=True)
            _cli(["generate", "--job", str(job_file(kit, form, work / "job.yaml", a.length)), "--out", str(store)])
        out[name] = store
    return out


def sizes(kit: dict, work: Path, a) -> None:
    print(f"{'store':>22} {'format':>11} {'B/position':>10} {'export pos/s':>12} {'import pos/s':>12}")
    for name, store in stores(kit, work, a).items():
        r = open_store(store)
        positions = r.meta.num_rows * r.meta.sequence.length
        every = field_bytes(store, [d.name for d in store.iterdir() if d.is_dir()])
        targets = field_bytes(store, target_fields(r.meta))
        print(f"{name:>22} {'darkstore':>11} {every / positions:10.1f}   (targets alone {targets / positions:.1f} B)")
        for fmt in (f for f in FORMATS.values() if f.writes):
            out = work / "exports" / fmt.name
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            _cli(["targets", "export", str(store), "-f", fmt.name, "--out", str(out)])
            t_export = time.perf_counter() - t0
            back = work / "imported.zarr"
            shutil.rmtree(back, ignore_errors=True)
            t0 = time.perf_counter()
            _cli(["targets", "import", str(out), "-f", fmt.name, "--tokenizer", kit["tokenizer"], "--out", str(back)])
            t_import = time.perf_counter() - t0
            print(f"{'':>22} {fmt.name:>11} {folder_bytes(out, 'data/*.parquet') / positions:10.1f} "
                  f"{positions / t_export:12,.0f} {positions / t_import:12,.0f}", flush=True)


def efficiency(kit: dict, work: Path, a) -> float:
    store = stores(kit, work, a)[f"topk:{a.k} uint8 steps"]
    r = open_store(store)
    names = ["tokens", "loss_mask", "index", *target_fields(r.meta)]
    t_read, t_export = [], []
    for i in range(a.rounds + 1):
        def read():
            for c in r.finished_chunks():
                r.read_chunks([c], names)

        def export():
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                export_store(str(store), "hf", Path(tmp) / "x")

        runs = [(t_read, read), (t_export, export)]
        for out, fn in runs if i % 2 else runs[::-1]:
            t0 = time.perf_counter()
            fn()
            if i:
                out.append(time.perf_counter() - t0)
    m, lo, hi = paired_ratio(t_read, t_export)
    print(f"in-process: the hf export takes {1 / m:.2f}× a plain read of the same fields (ratio {m:.3f}, range "
          f"{lo:.3f}–{hi:.3f}, {len(t_read)} pairs)")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megabytes", type=float, default=0.5)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "darkstore-bench-interop")
    a = ap.parse_args()
    print(machine(), file=sys.stderr)
    kit = setup(a.work / "kit", a)
    sizes(kit, a.work, a)
    print(f"hf_export_efficiency: {efficiency(kit, a.work, a):.3f}")


if __name__ == "__main__":
    main()
