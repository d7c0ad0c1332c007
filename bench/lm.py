"""What a per-token store costs and loses, and what generation costs over the teachers' bare forward.

    ./dev bench lm [--megabytes 1 --vocab 2048 --length 128 --steps 400 --rounds 3]

Real text present on every machine: about ``--megabytes`` of the Python standard library's sources, split by
file into a transfer set and held-out files (``darkstore_app.lmkit.split_corpus``); a byte-level BPE tokenizer
trained on the transfer files; three small built-in GPTs trained on them for ``--steps`` steps each (cached
in ``--work`` between runs; ``--layers`` and ``--width`` size them: as in published language models, most of
their work is in the layers, not in the output head). Then, through the CLI as a user runs it, one store per target form, and per form:

- bytes on disk per token (every field) and per kept entry (the target fields over positions × K), against a
  plain layout of float16 values + int32 indices + a float32 tail, raw and zstd-compressed;
- KL(p ‖ q) in nats per token between the exact ensemble distribution p (float64, recomputed from the
  teachers) and what the store gives back q (a top-k's tail spread evenly; a sampled store's smoothed sample
  frequencies); for top-k also the KL between the exact top-k (head and tail bucket) and the stored one: what
  quantising the values lost;
- generation throughput: ``run_sequence_chunks`` in-process against the members' bare forward (backbone and
  full head, nothing combined, encoded or written) over the same batches, chunk by chunk in alternating
  order, the median of the paired per-chunk ratios; and the whole ``darkstore generate`` process's tokens/s
  beside it.

Last lines: ``lm_generate_efficiency: <bare forward time / generation time>`` and
``topk32_bytes_per_entry: <bytes>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import machine, paired_ratio

from darkstore.lm import load_lm
from darkstore.models import ModelSpec
from darkstore_app import lmkit
from storage import open_store
from storage.forms import form_of

FORMS = ["topk:8", "topk:32", "topk:128", "topk:32/fp16", "sampled:8", "sampled:32", "dense"]


def setup(work: Path, a) -> dict:
    """Corpus, tokenizer and trained teachers (reused when ``work`` holds them for the same arguments)."""
    key = json.dumps({"teacher_recipe": 2,  # 2: lmkit.train_gpt warms the learning rate up
                      **{k: getattr(a, k) for k in ("megabytes", "vocab", "length", "steps", "layers", "width")}},
                     sort_keys=True)
    stamp = work / "setup.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return json.loads(stamp.read_text())
    shutil.rmtree(work, ignore_errors=True)
    transfer, heldout = lmkit.split_corpus(work / "corpus", a.megabytes)
    tok = lmkit.train_tokenizer(sorted(transfer.glob("*.py")), work / "tok", a.vocab)
    from darkstore.data import TextSpec
    from darkstore.text import TextSet

    rows = TextSet(TextSpec(root=str(transfer), glob="*.py", tokenizer=str(tok), length=a.length), transfer,
                   tok).rows.tokens
    w, n = a.width, a.layers
    sizes = [{"n_layer": n, "n_head": 4, "n_embd": w}, {"n_layer": n + 1, "n_head": 4, "n_embd": w * 3 // 4},
             {"n_layer": max(1, n - 1), "n_head": 4, "n_embd": w}]
    members = []
    for i, size in enumerate(sizes):
        t0 = time.perf_counter()
        m = lmkit.train_gpt(work / f"teacher{i}.safetensors", rows, a.vocab, steps=a.steps, seed=i,
                            block_size=a.length, **size)
        members.append({**m, "weights": str(work / m["weights"]), "tokenizer": str(tok)})
        print(f"trained teacher{i} {size} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = {"key": key, "transfer": str(transfer), "heldout": str(heldout), "tokenizer": str(tok),
           "members": members, "rows": int(len(rows))}
    stamp.write_text(json.dumps(out))
    return out


def job_file(kit: dict, form: str, path: Path, length: int) -> Path:
    targets: object = form
    if form.endswith("/fp16"):
        targets = {"form": "topk", "k": int(form.split(":")[1].split("/")[0]), "step": 0}
    path.write_text(yaml.safe_dump({
        "teachers": {"members": kit["members"]}, "targets": targets,
        "data": {"kind": "text", "root": kit["transfer"], "glob": "*.py", "tokenizer": kit["tokenizer"],
                 "length": length}}))
    return path


def field_bytes(store: Path, names) -> int:
    return sum(f.stat().st_size for n in names for f in (store / n / "c").rglob("*") if f.is_file())


def exact_logp(kit: dict, tokens: np.ndarray, vocab: int) -> torch.Tensor:
    """[N, L, V] the ensemble's geometric mean in float64, log-normalised."""
    zs = []
    for m in kit["members"]:
        lm = load_lm(ModelSpec.model_validate(m), vocab_size=vocab)
        lm.module.double()
        with torch.inference_mode():
            zs.append(lm.module(torch.from_numpy(tokens[:, :-1].astype(np.int64)))[..., :vocab].double())
    return torch.stack(zs).mean(0).log_softmax(-1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    p = p_log.exp()
    return float(torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1).mean())


def losses(store: Path, exact: torch.Tensor, rows: np.ndarray) -> tuple[float, float | None]:
    """KL from the exact distribution to what the store gives back, and (top-k) to the stored top-k's
    head-and-tail buckets from the exact ones."""
    r = open_store(store)
    form, meta = form_of(r.meta), r.meta
    names = [f.name for f in form.fields]
    got = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "u" and k != "topk_logits" else v)
           for k, v in r.read(rows, names).items()}
    q = form.teacher_logp(got, meta).double()
    whole = kl(exact, q)
    if meta.target_form != "topk":
        return whole, None
    idx = got["topk_index"].long()
    ex_head = exact.gather(-1, idx)
    ex_tail = torch.log1p(-ex_head.exp().sum(-1).clamp(max=1 - 1e-12))
    stored = torch.cat([form.head(got, meta).double(), got["tail_lse"].double()[..., None]], -1).log_softmax(-1)
    return whole, kl(torch.cat([ex_head, ex_tail[..., None]], -1), stored)


def report_forms(kit: dict, work: Path, a) -> float:
    print(f"{'form':>14} {'B/token':>8} {'B/entry':>8} {'plain raw':>10} {'plain zstd':>10} {'KL exact':>9} "
          f"{'KL top-k':>9} {'CLI s':>6} {'CLI tok/s':>10}")
    topk32 = float("nan")
    for form in FORMS:
        if form == "dense" and a.vocab > 4096:
            continue
        store = work / "stores" / form.replace(":", "_").replace("/", "_")
        shutil.rmtree(store, ignore_errors=True)
        job = job_file(kit, form, work / "job.yaml", a.length)
        t0 = time.perf_counter()
        r = _cli(["generate", "--job", str(job), "--out", str(store)])
        took = time.perf_counter() - t0
        meta = open_store(store).meta
        positions = meta.num_rows * meta.sequence.length
        rows = np.arange(min(a.kl_rows, meta.num_rows))  # each job has its own row order: its own first rows
        exact = exact_logp(kit, open_store(store).read(rows, ["tokens"])["tokens"], a.vocab)
        names = [f.name for f in form_of(meta).fields]
        target = field_bytes(store, names)
        k = meta.targets.k if meta.targets else meta.num_classes
        plain_raw, plain_zstd = _plain(open_store(store), k, names)
        whole, head = losses(store, exact, rows)
        entry = target / (positions * k)
        if form == "topk:32":
            topk32 = entry
        print(f"{form:>14} {field_bytes(store, [d.name for d in store.iterdir() if d.is_dir()]) / positions:8.1f} "
              f"{entry:8.2f} {plain_raw:10.2f} {plain_zstd:10.2f} {whole:9.4f} "
              f"{'-' if head is None else f'{head:.2e}':>9} {took:6.1f} {positions / took:10,.0f}", flush=True)
        del r
    return topk32


def _plain(r, k: int, names) -> tuple[float, float]:
    """Bytes per entry of the same targets laid out plainly: float16 values, int32 indices, float32 tail."""
    from numcodecs import Zstd

    rows = np.arange(min(r.meta.num_rows, 256))
    got = r.read(rows, names)
    n = len(rows) * r.meta.sequence.length * k
    if "sample_index" in got:
        parts = [got["sample_index"].astype(np.int32)]
    elif "logits" in got:
        parts = [got["logits"].astype(np.float16)]
    else:
        head = form_of(r.meta).head({"topk_logits": torch.from_numpy(got["topk_logits"])}, r.meta)
        parts = [head.numpy().astype(np.float16), got["topk_index"].astype(np.int32),
                 got["tail_lse"].astype(np.float32)]
    raw = sum(p.nbytes for p in parts)
    return raw / n, sum(len(Zstd(level=3).encode(np.ascontiguousarray(p))) for p in parts) / n


def _cli(args: list[str]):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    return r


def efficiency(kit: dict, work: Path, a) -> float:
    """Generation in-process against the bare forward over the same rows, chunk by chunk: each chunk's rows
    through the bare forward and the same chunk generated and committed, side by side in alternating order,
    so that the drift of a shared machine hits both alike; the median of the paired per-chunk ratios."""
    from teacher_service.generate import default_batch, prepare
    from teacher_service.prepared import in_store_order
    from teacher_service.kinds.tokens import run_sequence_chunks
    from teacher_service.spec import JobSpec
    from storage import StoreWriter

    job = prepare(JobSpec.from_file(job_file(kit, "topk:32", work / "eff.yaml", a.length)))
    members, v = job.members, job.meta.num_classes
    batch = a.batch_size or default_batch(job.meta)
    data = in_store_order(job.data, job.meta)  # the rows in the order generation reads them

    @torch.inference_mode()
    def bare(start: int, stop: int) -> None:
        tokens = data.get_batch(np.arange(start, stop))[0]
        for b0 in range(0, len(tokens), batch):
            x = tokens[b0:b0 + batch, :-1]
            for m in members:
                m.logits(m.hidden(x))[..., :v]

    store = work / "eff-store"
    tb, tg = [], []
    for r in range(a.rounds + 1):  # the first round warms up, untimed
        shutil.rmtree(store, ignore_errors=True)
        w = StoreWriter.open_or_create(store, job.meta)
        for i in range(job.meta.n_chunks):
            runs = [(tb, lambda: bare(*w.bounds(i))),
                    (tg, lambda: run_sequence_chunks(job, w, [i], batch_size=batch))]
            for out, fn in runs if (r + i) % 2 else runs[::-1]:
                t0 = time.perf_counter()
                fn()
                if r:
                    out.append(time.perf_counter() - t0)
    m, lo, hi = paired_ratio(tb, tg)
    n = job.meta.num_rows * a.length * a.rounds
    print(f"\ngeneration (topk:32, {len(members)} teachers, batch {batch} rows): {n / sum(tg):,.0f} tokens/s; "
          f"bare forward {n / sum(tb):,.0f} tokens/s; bare / generation per chunk {m:.3f} (range {lo:.3f}–{hi:.3f}, "
          f"{len(tb)} pairs of {job.meta.chunk_rows}-row chunks, {a.rounds} rounds); totals {sum(tb) / sum(tg):.3f}")
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=float, default=1.0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--layers", type=int, default=4, help="the first teacher's layers (the others: one more, one "
                   "fewer)")
    p.add_argument("--width", type=int, default=256, help="the first teacher's width (the second: 3/4 of it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: what `generate` "
                   "takes by default, rows of about 8,192 positions)")
    p.add_argument("--kl-rows", type=int, default=48, help="rows whose exact distribution is recomputed")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "darkstore-bench-lm")
    a = p.parse_args()
    print(f"machine: {machine()}")
    kit = setup(a.work, a)
    print(f"corpus: {kit['rows']:,} rows of {a.length} tokens from {kit['transfer']} (held out: {kit['heldout']}); "
          f"vocabulary {a.vocab}; 3 teachers trained {a.steps} steps\n")
    topk32 = report_forms(kit, a.work, a)
    eff = efficiency(kit, a.work, a)
    print(f"\nlm_generate_efficiency: {eff:.3f}")
    print(f"topk32_bytes_per_entry: {topk32:.3f}")


if __name__ == "__main__":
    main()
