"""What sparse targets cost and lose: bytes, write and read speed, and divergence from the dense targets.

    ./dev bench sparse [--rows 20000 --repeats 5]

For C = 1,000 and C = 10,000 classes, synthetic ensemble logits shaped like a confident classifier's
(a normal spread of 3 with the labelled class 6 higher) are written through ``StoreWriter`` as dense
float16 targets and as each sparse form, with the same sparsification the generator runs
(each form's ``encode`` in ``storage.forms``). Per form it prints:

- bytes per row on disk (zstd), and dense / sparse;
- write and read time relative to dense: each repeat writes (and then reads, in windows of 4 chunks
  through ``StoreReader.read_chunks``, checksums checked) every form in turn, and the paired ratios'
  median and range are reported;
- divergence from the dense targets at T = 1 and T = 4, in nats, averaged over rows:
  top-k — KL(p_T ‖ p̂_T) with the tail spread evenly (``losses.topk_teacher_logp``), and the bucket
  form's KL over head + "other" (0 at T = 1: nothing it keeps is approximate);
  sampled — KL(p̂ ‖ p_T) of the samples' empirical distribution from the distribution they were
  drawn from (a store is sampled at one T: the T = 4 column is a second store sampled at 4).

Student accuracy per form at equal storage is ``bench/sparse_students.py``'s. Last line:
``sparse_bytes_ratio_topk16_c1000: <dense bytes / top-16 bytes>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine

from storage import StoreMeta, StoreWriter, TeacherRecord, TransferSetRecord, open_store
from storage.fields import target_fields
from storage.schema import TargetsRecord
from student_trainer import losses
from storage.forms import form_of

FORMS = ["dense", "topk:5", "topk:16", "topk:64", "sampled:16", "sampled:64"]


def logits(rows: int, classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (rows, classes))
    z[np.arange(rows), rng.integers(0, classes, rows)] += 6
    return (z - z.max(1, keepdims=True)).astype(np.float32)


def meta_for(rows: int, classes: int, form: str) -> StoreMeta:
    t = TargetsRecord.model_validate(form)
    return StoreMeta(software_version="bench", created_at="now", job_key=f"{form}{classes}".ljust(64, "x"),
                     num_rows=rows, num_classes=classes, chunk_rows=1024, dtype="float16", compressor="zstd",
                     combine="geometric", temperature=1.0, keep_members=False,
                     teachers=[TeacherRecord(name="t", arch="mlp", format="safetensors", num_params=1)],
                     transfer_set=TransferSetRecord(spec={"kind": "arrays", "path": "x"}, fingerprint="f" * 64,
                                                    num_samples=rows),
                     targets=None if t.form == "dense" else t)


def write(path: Path, z: np.ndarray, form: str) -> float:
    """Seconds to sparsify and write every chunk (what generation's writer side does)."""
    meta = meta_for(len(z), z.shape[1], form)
    w = StoreWriter.open_or_create(path, meta, overwrite=True)
    t0 = time.perf_counter()
    for i in range(meta.n_chunks):
        a, b = w.bounds(i)
        form = form_of(meta)
        kw = {k: v.numpy() for k, v in form.encode(torch.from_numpy(z[a:b]), meta, form.draws(meta, i, (b - a,))).items()}
        if "logits" in kw or "topk_logits" in kw:
            key = "logits" if "logits" in kw else "topk_logits"
            kw[key] = np.clip(kw[key], -60000, None).astype(np.float16)
        w.write_chunk(i, labels=np.zeros(b - a, np.int64), index=np.arange(a, b), **kw)
    return time.perf_counter() - t0


def read(path: Path) -> float:
    r = open_store(path)
    chunks, fields = r.finished_chunks(), list(target_fields(r.meta))
    t0 = time.perf_counter()
    for w in range(0, len(chunks), 4):
        r.read_chunks(chunks[w:w + 4], fields)
    return time.perf_counter() - t0


def divergence(path: Path, z: np.ndarray, form: str, T: float) -> tuple[float, float | None]:
    """(mean KL of the form's reconstruction, mean bucket KL for top-k) against the dense targets at T."""
    r = open_store(path)
    got = {k: torch.from_numpy(v) for k, v in r.read(np.arange(len(z)), list(target_fields(r.meta))).items()}
    logp = torch.log_softmax(torch.from_numpy(z).double() / T, -1)
    if form.startswith("topk"):
        head, idx, tail = got["topk_logits"].double(), got["topk_index"], got["tail_lse"].double()
        approx = losses.topk_teacher_logp(idx, head, tail, z.shape[1], T)
        kl = (logp.exp() * (logp - approx)).sum(-1).mean()
        # the bucket form's own KL: the dense teacher's head and tail mass at T against the stored ones
        lp_head = logp.gather(1, idx.long())
        lp_tail = torch.log1p(-lp_head.exp().sum(-1).clamp(max=1 - 1e-12))
        dense_b = torch.cat([lp_head, lp_tail[:, None]], -1)
        stored_b = torch.log_softmax(torch.cat([head / T, losses.tail_at(tail, z.shape[1] - idx.shape[1], T)[:, None]],
                                               -1), -1)
        bucket = (dense_b.exp() * (dense_b - stored_b)).sum(-1).mean()
        return float(kl), float(bucket)
    idx = got["sample_index"].long()
    k = idx.shape[1]
    emp = torch.zeros(len(idx), z.shape[1], dtype=torch.float64).scatter_add_(1, idx, torch.ones(idx.shape,
                                                                                                  dtype=torch.float64)) / k
    kl = torch.where(emp > 0, emp * (emp.log() - logp), torch.zeros_like(emp)).sum(-1).mean()
    return float(kl), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000, help="rows at C = 1,000 (a tenth of them at C = 10,000)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    headline = None
    with tempfile.TemporaryDirectory(prefix="darkstore-bench-sparse-") as tmp:
        tmp = Path(tmp)
        for classes, rows in ((1000, a.rows), (10000, a.rows // 10)):
            z = logits(rows, classes, seed=classes)
            wt: dict[str, list[float]] = {f: [] for f in FORMS}
            rt: dict[str, list[float]] = {f: [] for f in FORMS}
            for _ in range(a.repeats):  # interleaved: every form once per repeat
                for f in FORMS:
                    wt[f].append(write(tmp / f"{classes}-{f}", z, f))
                for f in FORMS:
                    rt[f].append(read(tmp / f"{classes}-{f}"))
            dense_bytes = open_store(tmp / f"{classes}-dense").summary()["disk_bytes"] / rows
            print(f"\nC = {classes:,}: {rows:,} rows, float16 + zstd, chunks of 1,024; ratios: median (range) over "
                  f"{a.repeats} paired repeats")
            print("| targets | bytes/row | dense ÷ this | write vs dense | read vs dense | KL T=1 | KL T=4 | bucket KL T=4 |")
            print("|---|---|---|---|---|---|---|---|")
            for f in FORMS:
                b = open_store(tmp / f"{classes}-{f}").summary()["disk_bytes"] / rows
                w = [x / y for x, y in zip(wt[f], wt["dense"])]
                r = [x / y for x, y in zip(rt[f], rt["dense"])]
                if f == "dense":
                    kl1 = kl4 = "0"
                    b4 = "—"
                elif f.startswith("topk"):
                    kl1 = f"{divergence(tmp / f'{classes}-{f}', z, f, 1.0)[0]:.4f}"
                    k4, bk4 = divergence(tmp / f"{classes}-{f}", z, f, 4.0)
                    kl4, b4 = f"{k4:.4f}", f"{bk4:.4f}"
                else:
                    kl1 = f"{divergence(tmp / f'{classes}-{f}', z, f, 1.0)[0]:.4f}"
                    write(tmp / f"{classes}-{f}@4", z, f"{f}@4")
                    kl4, b4 = f"{divergence(tmp / f'{classes}-{f}@4', z, f, 4.0)[0]:.4f}", "—"
                print(f"| {f} | {b:,.1f} | {dense_bytes / b:.1f}× | {statistics.median(w):.2f} "
                      f"({min(w):.2f}–{max(w):.2f}) | {statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f}) | "
                      f"{kl1} | {kl4} | {b4} |")
                if classes == 1000 and f == "topk:16":
                    headline = dense_bytes / b
    print(f"\nsparse_bytes_ratio_topk16_c1000: {headline:.1f}")


if __name__ == "__main__":
    main()
