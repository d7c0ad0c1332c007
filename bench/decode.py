"""What reading an ImageNet-like folder costs per image, and what the decoder and ``resample`` change.

    ./dev bench decode [--images 1024 --repeats 7 --cli-repeats 3]

Writes ``--images`` JPEGs of ImageNet's typical shape (500x375 and 375x500, quality 90, smooth content with
noise) into class folders, then compares, interleaved, each ratio the median of paired ratios with its range:

- decoding alone (uint8 RGB): PIL (``Image.open().convert("RGB")``, the previous reader) against
  ``darkstore.data.read_image`` (torchvision.io where it gives PIL's pixels);
- one sample as the teachers get it, shorter side 256 then centre crop 224 (the image-folder set's
  ``__getitem__``): ``resample: float`` against ``resample: uint8``;
- as users run it: whole ``darkstore generate`` processes over the folder (one ``small_cnn`` teacher that
  squashes to 64 px, so reading dominates), PIL decoding against torchvision.io and ``resample: float``
  against ``uint8``, with the default loader workers.

All single-threaded in process (``torch.set_num_threads(1)``), as one DataLoader worker decodes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from _common import ROOT, machine, med, paired, teachers

import darkstore.data as data
import darkstore.transfer as transfer

PIL_GENERATE = ("import darkstore.data as d; d._fast_decoder.cache_clear(); d._fast_decoder = lambda: None; "
                "from darkstore_app.cli import main; main()")


def write_folder(root: Path, n: int, classes: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (375, 500) if i % 3 else (500, 375)
        base = rng.normal(size=(h // 8 + 1, w // 8 + 1, 3))
        a = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
        a = (a - a.min()) / (a.max() - a.min()) * 255 + rng.normal(scale=8, size=a.shape)
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def per_image(fn, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - t0) / len(items)


def interleave(variants: dict, items, repeats: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up, untimed: first-call imports and the page cache
        per_image(fn, items[:16])
    out = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            out[k].append(per_image(fn, items))
    return out


def cli(work: Path, args: list[str], pil: bool) -> float:
    import subprocess

    cmd = [sys.executable, "-c", PIL_GENERATE, *args] if pil else [sys.executable, "-m", "darkstore_app.cli", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cli-repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="darkstore-decode-"))
    try:
        root = write_folder(work / "imgs", args.images)
        paths = [s for s, _ in transfer.open_transfer_set({"kind": "image_folder", "root": str(root)}).samples]
        print(f"{len(paths)} JPEGs, 500x375 / 375x500, {sum(Path(p).stat().st_size for p in paths) / 1e6:.1f} MB")

        t = interleave({"pil": lambda p: data._read_image_pil(p, "RGB"), "ours": data.read_image}, paths, args.repeats)
        print(f"decode: PIL {med(t['pil']) * 1e3:.2f} ms, torchvision.io {med(t['ours']) * 1e3:.2f} ms per image; "
              f"PIL / ours {paired(t['pil'], t['ours'])}")

        geometry = {"kind": "image_folder", "root": str(root), "short_side": 256, "crop": 224}
        sets = {r: transfer.open_transfer_set({**geometry, "resample": r}) for r in ("float", "uint8")}
        idx = list(range(len(paths)))
        t = interleave({r: (lambda i, s=s: s[i]) for r, s in sets.items()}, idx, args.repeats)
        print(f"decode + 256/224: float {med(t['float']) * 1e3:.2f} ms, uint8 {med(t['uint8']) * 1e3:.2f} ms per "
              f"image; float / uint8 {paired(t['float'], t['uint8'])}")

        members = teachers(work / "t", 1, 8, "small_cnn", width=8)
        members[0]["preprocess"] = {"resize": 64}
        (work / "ens.yaml").write_text(yaml.safe_dump({"num_classes": 8, "members": members}))
        for r in ("float", "uint8"):
            (work / f"{r}.yaml").write_text(yaml.safe_dump({**geometry, "resample": r}))
        runs = {"pil float": ("float", True), "ours float": ("float", False), "ours uint8": ("uint8", False)}
        t = {k: [] for k in runs}
        for i in range(args.cli_repeats):
            for k, (r, pil) in runs.items():
                out = work / f"s-{k.replace(' ', '-')}-{i}"
                t[k].append(cli(work, ["generate", "--teachers", "ens.yaml", "--data", f"{r}.yaml", "--out",
                                       str(out)], pil))
                shutil.rmtree(out)
        print("whole `darkstore generate` processes ({} images, default loader workers): ".format(len(paths))
              + ", ".join(f"{k} {med(v):.1f} s" for k, v in t.items()))
        print(f"  PIL / torchvision.io (resample float): {paired(t['pil float'], t['ours float'])}")
        print(f"  float / uint8 (torchvision.io): {paired(t['ours float'], t['ours uint8'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
