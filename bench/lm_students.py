"""Language-model students from cached per-token targets, on real text, through the CLI as users run them.

    ./dev bench lm_students [--parts quality,offline,efficiency --forms ce,dense,... --recipes lm,plain
                             --seeds 0,1,2 --megabytes 0.5]

The corpus, tokenizer and three trained GPT teachers are ``bench/lm.py``'s (cached in ``--work``): about
``--megabytes`` of the standard library's sources, split by file into transfer files and held-out files that
generation never reads. The held-out files make an eval store; every student is judged there (``--eval-store``),
against the teachers' exact perplexity on the same tokens.

- ``quality``: one store per target form, then ``darkstore train`` for each form and seed, the same student,
  steps, α and T = 1: next-token cross-entropy only (``--loss ce``), dense KD (the vocabulary is small enough),
  top-k at several K, sampled at about top-32's bytes; each with darkstore's language-model optimiser
  defaults (``lm``: clipping at 1, β2 0.95, decay on matrices, cosine to 10 %) and with the class students'
  settings (``plain``: none of those, as the twin trains). Prints held-out perplexity mean ± std over the seeds,
  bits per byte, agreement, the store's bytes per token and the wall seconds of each `train`; beside them the
  same recipe in plain PyTorch (``bench/lm_twin.py``, no darkstore code) trained from the top-32 store's
  fields, which darkstore's must match within the spread.
- ``offline``: four students (the seeds), offline as one command (a grid whose ``job:`` fills the store, then
  the four train together) against online (``bench/lm_twin.py --teachers``: each student's process runs the
  teachers at every step), whole processes, rounds interleaved; last-but-one line
  ``lm_offline_vs_online: <online seconds / offline seconds>``.
- ``efficiency``: in one process, the trainer's step (the GPT, the sliced top-k loss, AdamW) fed by the store's
  loader against the same loop with every target preloaded in memory, the same batches in the same order,
  alternated; last line ``lm_train_efficiency: <preloaded / streamed>`` (the median of the paired ratios).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from _common import machine, paired_ratio

import lm  # bench/lm.py: corpus, tokenizer, teachers

FORMS = ["ce", "dense", "topk:8", "topk:32", "topk:128", "sampled:48"]  # ce: next-token only, on the top-32 store
HERE = Path(__file__).resolve().parent


def cli(args: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], capture_output=True, text=True, cwd=cwd)
    if r.returncode:
        raise SystemExit(f"darkstore {' '.join(args)}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def stores(kit: dict, work: Path, a) -> dict[str, Path]:
    """One store per target form over the transfer files, and the eval store over the held-out files."""
    out = {}
    for form in [f for f in FORMS if f != "ce"] + ["eval"]:
        path = work / "stores" / form.replace(":", "")
        job = lm.job_file(kit, "topk:8" if form == "eval" else form, work / f"{path.name}.yaml", a.length)
        if form == "eval":
            spec = yaml.safe_load(job.read_text())
            spec["data"]["root"] = kit["heldout"]
            job.write_text(yaml.safe_dump(spec))
        if not (path / "zarr.json").exists():
            cli(["generate", "--job", str(job), "--out", str(path)])
        out[form] = path
    return out


def student_args(a) -> list[str]:
    kw = {"n_layer": a.layers, "n_head": 2, "n_embd": a.width, "block_size": a.length}
    return ["--student", "gpt", "--arch-kwargs", json.dumps(kw), "--epochs", str(a.epochs), "--batch-size",
            str(a.batch_size), "--lr", str(a.lr), "--warmup", str(a.warmup), "--alpha", str(a.alpha)]


def store_bytes(path: Path) -> float:
    from storage import open_store
    from storage.fields import row_fields

    r = open_store(path)
    names = [f.name for f in row_fields(r.meta) if f.name not in ("tokens", "loss_mask", "index")]
    return lm.field_bytes(path, names) / r.meta.sequence.positions


#: quality's optimiser recipes: darkstore's language-model defaults, and the class students' settings (no
#: clipping, β2 0.999, decay on every parameter, cosine to zero: what LM students ran with before, and the twin)
RECIPES = {"lm": [], "plain": ["--max-grad-norm", "0", "--betas", "0.9,0.999", "--decay", "all", "--lr-floor", "0"]}


def quality(kit: dict, work: Path, st: dict[str, Path], a) -> None:
    print(f"\n{'form':>12} {'recipe':>7} {'B/token':>8} {'held-out perplexity':>22} {'bits/byte':>10} "
          f"{'agreement':>10} {'train s':>8}")
    for form, recipe in [(f, r) for f in a.forms for r in a.recipes]:
        store = st["topk:32" if form == "ce" else form]
        ppl, bpb, agree, secs = [], [], [], []
        for seed in a.seeds:
            out = work / "runs" / f"{form.replace(':', '')}-{recipe}-s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            extra = (["--loss", "ce"] if form == "ce" else []) + RECIPES[recipe]
            secs.append(cli(["train", "--store", str(store), "--eval-store", str(st["eval"]), "--out", str(out),
                             "--seed", str(seed), *student_args(a), *extra]))
            ev = json.loads((out / "eval.json").read_text())
            ppl.append(ev["metrics"]["perplexity"])
            bpb.append(ev["metrics"]["bits_per_byte"])
            agree.append(ev["metrics"]["agreement"])
        teacher = ev["teacher_metrics"]["perplexity"]
        size = "—" if form == "ce" else f"{store_bytes(store):.1f}"
        print(f"{form:>12} {recipe:>7} {size:>8} {statistics.fmean(ppl):>13.3f} ± {statistics.stdev(ppl):<6.3f} "
              f"{statistics.fmean(bpb):>10.4f} {statistics.fmean(agree):>10.4f} {statistics.fmean(secs):>8.1f}",
              flush=True)
    print(f"{'teachers':>12} {'':>7} {'':>8} {teacher:>13.3f} (the ensemble on the same held-out tokens, exact)")
    if "topk:32" in a.forms:
        twin(st, work, a)


def export_arrays(st: dict[str, Path], work: Path) -> tuple[Path, Path, Path]:
    """The top-32 store's tokens and targets and the eval store's tokens as .npz files the twin reads."""
    from storage import open_store
    from storage.forms import form_of

    r = open_store(st["topk:32"])
    f = r.read(r.finished_rows(), ["tokens", "loss_mask", "topk_index", "topk_logits", "tail_lse"])
    head = form_of(r.meta).head({"topk_logits": __import__("torch").from_numpy(f["topk_logits"])}, r.meta).numpy()
    rows, targets, held = work / "twin-rows.npz", work / "twin-targets.npz", work / "twin-heldout.npz"
    np.savez(rows, tokens=f["tokens"].astype(np.int32), loss_mask=f["loss_mask"])
    np.savez(targets, topk_index=f["topk_index"].astype(np.int64), head=head, tail_lse=f["tail_lse"])
    e = open_store(st["eval"])
    h = e.read(e.finished_rows(), ["tokens", "loss_mask"])
    np.savez(held, tokens=h["tokens"].astype(np.int32), loss_mask=h["loss_mask"])
    return rows, targets, held


def twin_args(a, rows: Path, held: Path, out: Path, seed: int) -> list[str]:
    return [sys.executable, str(HERE / "lm_twin.py"), "--rows", str(rows), "--heldout", str(held), "--vocab",
            str(a.vocab), "--layers", str(a.layers), "--width", str(a.width), "--epochs", str(a.epochs),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--warmup", str(a.warmup), "--alpha", str(a.alpha),
            "--seed", str(seed),
            "--out", str(out)]


def twin(st: dict[str, Path], work: Path, a) -> None:
    rows, targets, held = export_arrays(st, work)
    ppl, secs = [], []
    for seed in a.seeds:
        out = work / f"twin-{seed}.json"
        t0 = time.perf_counter()
        subprocess.run([*twin_args(a, rows, held, out, seed), "--targets", str(targets)], check=True)
        secs.append(time.perf_counter() - t0)
        ppl.append(json.loads(out.read_text())["perplexity"])
    print(f"{'plain twin':>12} {'':>8} {statistics.fmean(ppl):>13.3f} ± {statistics.stdev(ppl):<6.3f} "
          f"{'':>10} {'':>10} {statistics.fmean(secs):>8.1f}   (topk:32, plain PyTorch, no darkstore code)")


def offline_vs_online(kit: dict, work: Path, st: dict[str, Path], a) -> float:
    """Four students: one command (generate then four students together) against four online processes."""
    rows, _, held = export_arrays(st, work)
    (work / "teachers.json").write_text(json.dumps([{"arch_kwargs": {k: m["arch_kwargs"][k] for k in
                                                                      ("n_layer", "n_head", "n_embd", "block_size")},
                                                     "weights": m["weights"]} for m in kit["members"]]))
    job = lm.job_file(kit, "topk:32", work / "offline-job.yaml", a.length)
    students = dict(zip(student_args(a)[::2], student_args(a)[1::2]))
    grid = {"job": str(job), "store": str(work / "offline-store"),
            "base": {"student": {"arch": "gpt", "arch_kwargs": json.loads(students["--arch-kwargs"])},
                     "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "warmup": a.warmup,
                     "alpha": a.alpha},
            "grid": {"lr": [a.lr * f for f in (1.0, 0.7, 0.5, 1.4)]}}  # four students that share batches
    (work / "grid.yaml").write_text(yaml.safe_dump(grid))
    off, on = [], []
    for r in range(a.rounds):
        shutil.rmtree(work / "offline-store", ignore_errors=True)
        shutil.rmtree(work / "offline-sweep", ignore_errors=True)
        runs = [(off, lambda: cli(["sweep", "--grid", str(work / "grid.yaml"), "--out", str(work / "offline-sweep")])),
                (on, lambda: sum(_timed_twin(a, rows, held, work, s) for s in range(4)))]
        for out, fn in runs if r % 2 else runs[::-1]:
            out.append(fn())
    m, lo, hi = paired_ratio(on, off)
    print(f"\n4 LM students, whole processes: offline (one `darkstore sweep` with job:, teachers once) "
          f"{statistics.median(off):.1f} s; online (4 processes, teachers every step) {statistics.median(on):.1f} s; "
          f"online / offline {m:.2f}× (range {lo:.2f}–{hi:.2f}, {a.rounds} rounds)")
    return m


def _timed_twin(a, rows: Path, held: Path, work: Path, seed: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([*twin_args(a, rows, held, work / f"online-{seed}.json", seed), "--teachers",
                    str(work / "teachers.json"), "--k", "32"], check=True)
    return time.perf_counter() - t0


def efficiency(st: dict[str, Path], a) -> float:
    """The trainer's step fed by the loader against the same step on preloaded targets (module docstring)."""
    import torch

    from darkstore.gpt import GPT
    from storage import open_store
    from student_trainer import token_losses
    from student_trainer.config import TrainConfig
    from student_trainer.forms import soft_term
    from student_trainer.loader import make_loader, stored_inputs_batch, window_chunks
    from student_trainer.retemper import plan

    reader = open_store(st["topk:32"])
    meta, rows = reader.meta, reader.finished_rows()
    window = window_chunks(meta, TrainConfig.model_fields["shuffle_buffer_mb"].default)
    loader = make_loader(reader, rows, batch_size=a.batch_size, seed=0, buffer_chunks=window)
    names = ["tokens", "loss_mask", "topk_index", "topk_logits", "tail_lse"]
    everything = reader.read(rows, names)
    soft = soft_term(meta, plan(meta, 1.0), topk_loss="bucket")

    def preloaded(epoch: int):
        stream = loader.stream
        stream.epoch = epoch
        for shard in stream.shards():
            for r in stream.plan(shard):
                yield stored_inputs_batch(meta.kind, {k: v[r] for k, v in everything.items()}, r, shard, 0)

    def from_store(epoch: int):
        loader.load_state_dict({"epoch": 0, "seen": {}})  # a whole epoch again, not the rest of one
        return loader.epoch(epoch)

    def run(epoch_of):
        def go() -> int:
            torch.manual_seed(0)
            model = GPT(meta.num_classes, block_size=a.length, n_layer=a.layers, n_head=2, n_embd=a.width)
            opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
            steps = 0
            for steps, b in enumerate(epoch_of(1), 1):
                loss = token_losses.sliced_loss(model.hidden(b.x), model.head, b.labels, soft.decode(b.stored()),
                                                vocab=meta.num_classes, soft=soft, alpha=a.alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return steps
        return go

    pre, streamed = run(preloaded), run(from_store)
    steps = pre(), streamed()  # and the first-use costs, untimed
    if steps[0] != steps[1] or not steps[0]:
        raise SystemExit("efficiency: the two loops did not take the same steps")
    tp, ts = [], []
    for i in range(a.repeats):
        for out, fn in ((tp, pre), (ts, streamed)) if i % 2 else ((ts, streamed), (tp, pre)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    m, lo, hi = paired_ratio(tp, ts)
    n = int(meta.sequence.positions)
    print(f"\nan epoch of {n:,} positions, topk:32: preloaded {n / statistics.median(tp):,.0f} tokens/s, streamed "
          f"{n / statistics.median(ts):,.0f} tokens/s; preloaded / streamed {m:.3f} (range {lo:.3f}–{hi:.3f}, "
          f"{a.repeats} pairs)")
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="quality,offline,efficiency")
    p.add_argument("--forms", default=",".join(FORMS), help="quality's target forms (the twin runs with topk:32)")
    p.add_argument("--megabytes", type=float, default=0.5)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=400, help="the teachers' training steps")
    p.add_argument("--teacher-layers", dest="tlayers", type=int, default=3)
    p.add_argument("--teacher-width", dest="twidth", type=int, default=192)
    p.add_argument("--layers", type=int, default=2, help="the student's")
    p.add_argument("--width", type=int, default=96, help="the student's")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipes", default="lm,plain", help=f"quality's optimiser recipes: {', '.join(RECIPES)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "darkstore-bench-lm-students")
    a = p.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.forms = a.forms.split(",")
    a.recipes = a.recipes.split(",")
    if not set(a.recipes) <= set(RECIPES):
        p.error(f"--recipes: each of {', '.join(RECIPES)}")
    if not set(a.forms) <= set(FORMS):
        p.error(f"--forms: each of {', '.join(FORMS)}")
    parts = set(a.parts.split(","))
    print(f"machine: {machine()}")
    setup = argparse.Namespace(megabytes=a.megabytes, vocab=a.vocab, length=a.length, steps=a.steps,
                               layers=a.tlayers, width=a.twidth)
    kit = lm.setup(a.work / "kit", setup)
    st = stores(kit, a.work, a)
    print(f"corpus: {kit['rows']:,} rows of {a.length} tokens; vocabulary {a.vocab}; 3 teachers trained {a.steps} "
          f"steps; student GPT {a.layers} layers × {a.width}, {a.epochs} epochs of batch {a.batch_size}, lr {a.lr} "
          f"(warm-up {a.warmup:.0%}, cosine), α {a.alpha}, T 1; seeds {a.seeds}")
    if "quality" in parts:
        quality(kit, a.work, st, a)
    ratio = offline_vs_online(kit, a.work, st, a) if "offline" in parts else None
    eff = efficiency(st, a) if "efficiency" in parts else None
    if ratio is not None:
        print(f"lm_offline_vs_online: {ratio:.2f}")
    if eff is not None:
        print(f"lm_train_efficiency: {eff:.3f}")


if __name__ == "__main__":
    main()
