"""Students of conversations: the gold answers against the answers the teachers write, with and without
token-level targets, judged by exact match of the exported students' greedy answers.

    ./dev bench chat_students [--seeds 0,1,2 --train 6000 --held-out 400 --epochs 16 --work DIR]

A task with a right answer, built on every machine: questions in a chat template (ChatML) whose answers are
worked out in code, two kinds: the sum of two 2-digit numbers ("What is 37 + 48?" → "85") and a random word
spelt backwards ("Reverse the letters of kqzt." → "tzqk"). The held-out prompts are pairs and words the
training records never hold. A tokenizer is trained on the records (byte-level BPE, digits split one by one,
ChatML's tokens added); two built-in GPT teachers are trained on the gold conversations (loss on the answers).

Through the CLI, as users run it: a store of the gold conversations scored by the teachers (``topk:32``), and a
store of the teachers' own greedy answers to the same prompts (``responses: {temperature: 0}``). Then one
student spec (a smaller GPT), the same epochs, per seed:

- (a) gold answers, hard labels only (``--alpha 1``);
- (b) gold answers and the teachers' token-level targets (``--alpha 0.5``);
- (c) the teachers' written answers, hard labels only (sequence-level KD);
- (d) written answers and token-level targets.

Each run is exported (``darkstore export --format transformers``) and answers the held-out prompts greedily
through ``AutoTokenizer.apply_chat_template`` and ``generate``. Printed: exact match per variant, mean ± std over
the seeds (and per task), beside the teachers' own (their greedy answers written by darkstore).
Which variant wins is measured here, never asserted in a test.
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

import torch
import yaml

from _common import machine

from darkstore_app import lmkit

VARIANTS = {"a": ("gold", 1.0), "b": ("gold", 0.5), "c": ("written", 1.0), "d": ("written", 0.5)}


def cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"darkstore {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def answers_from_store(store: Path, tok_path: Path) -> dict[int, str]:
    """A responses store's written answers by prompt (the text before the turn's end)."""
    from darkstore.text import load_tokenizer
    from storage import open_store

    tok = load_tokenizer(tok_path).tokenizer
    r = open_store(store)
    got = r.read_chunks(r.finished_chunks(), ["tokens", "loss_mask", "index"])
    out = {}
    for row in range(len(got["index"])):
        on = got["loss_mask"][row].astype(bool)
        start = int(on.argmax()) + 1
        text = tok.decode(got["tokens"][row, start:start + int(on.sum())].tolist(), skip_special_tokens=False)
        out[int(got["index"][row]) // r.meta.sequence.responses.n] = text.split("<|im_end|>")[0].strip()
    return out


@torch.inference_mode()
def student_answers(folder: Path, prompts: list[str]) -> list[str]:
    """The exported student's greedy answers through transformers, as a user would get them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    out = []
    for i in range(0, len(prompts), 64):
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in prompts[i:i + 64]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        out += [t.split("<|im_end|>")[0].strip()
                for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)]
    return out


def exact(got: list[str], gold: list[dict], kind: str | None = None) -> float:
    pairs = [(g, r["messages"][1]["content"]) for g, r in zip(got, gold) if kind in (None, r["kind"])]
    return sum(a == b for a, b in pairs) / len(pairs)


def setup(work: Path, a) -> dict:
    """Records, tokenizer, teachers and the stores (kept in ``--work`` and reused while the settings that make
    them are the same)."""
    key = {"train": a.train, "held_out": a.held_out, "vocab": a.vocab, "teacher_width": a.teacher_width,
           "teacher_steps": a.teacher_steps}
    stamp = work / "setup.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == key):
        make(work, a)
        stamp.write_text(json.dumps(key))
    train, held = ([json.loads(line) for line in (work / f"{n}.jsonl").read_text().splitlines()]
                   for n in ("train", "held"))
    tok = work / "tok"
    ens = answers_from_store(work / "teachers_held", tok)
    ens_answers = [ens[i] for i in range(len(held))]
    written = answers_from_store(work / "written", tok)
    agree = sum(written[i] == r["messages"][1]["content"] for i, r in enumerate(train)) / len(train)
    return {"train": train, "held": held, "tok": tok, "teachers_exact": exact(ens_answers, held),
            "teachers_by_kind": {k: exact(ens_answers, held, k) for k in ("sum", "reverse")},
            "written_correct": agree}


def make(work: Path, a) -> None:
    """The records, tokenizer, two trained teachers, and three stores: the gold conversations scored, the
    teachers' answers to the training prompts and to the held-out ones."""
    from darkstore.transfer import open_transfer_set

    train = lmkit.qa_records(a.train, seed=1)
    held = lmkit.qa_records(a.held_out, seed=2, avoid={r["messages"][0]["content"] for r in train})
    for name, recs in (("train", train), ("held", held)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    texts = [f"{m['content']}" for r in train for m in r["messages"]]
    tok = lmkit.qa_tokenizer(work / "tok", texts, a.vocab)
    data = open_transfer_set(lmkit.chat_data(work / "train.jsonl", tok))
    vocab = data.tokenizer.vocab_size
    t0 = time.perf_counter()
    teachers = [lmkit.train_answer_gpt(work / f"teacher{i}.safetensors", data.rows.tokens, data.rows.mask, vocab,
                              steps=a.teacher_steps, seed=10 + i, block_size=lmkit.QA_LENGTH, n_layer=4, n_head=4,
                              n_embd=a.teacher_width) for i in range(2)]
    print(f"teachers: 2 GPTs of 4 layers × {a.teacher_width}, {a.teacher_steps} steps each, "
          f"{time.perf_counter() - t0:.0f} s")
    base = {"teachers": {"members": teachers}, "targets": "topk:32", "chunk_rows": 512}
    jobs = {"gold": {**base, "data": lmkit.chat_data(work / "train.jsonl", tok)},
            "written": {**base, "data": lmkit.chat_data(work / "train.jsonl", tok),
                        "responses": {"max_new_tokens": 8, "temperature": 0}},
            "teachers_held": {**base, "data": lmkit.chat_data(work / "held.jsonl", tok),
                              "responses": {"max_new_tokens": 8, "temperature": 0}}}
    for name, job in jobs.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump(job))
        shutil.rmtree(work / name, ignore_errors=True)
        cli("generate", "--job", str(work / f"{name}.yaml"), "--out", str(work / name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--held-out", type=int, default=400)
    p.add_argument("--vocab", type=int, default=400)
    p.add_argument("--teacher-width", type=int, default=128)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--student", default='{"n_layer": 3, "n_head": 4, "n_embd": 128}')
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default="a,b,c,d")
    p.add_argument("--work", default=None, help="keep the files here (default: a temporary folder)")
    a = p.parse_args()
    print(f"machine: {machine()}")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="darkstore-bench-chat-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        s = setup(work, a)
        print(f"teachers' greedy answers (written by darkstore): exact match {s['teachers_exact']:.3f} on "
              f"{len(s['held'])} held-out prompts (sums {s['teachers_by_kind']['sum']:.3f}, reversals "
              f"{s['teachers_by_kind']['reverse']:.3f}); {s['written_correct']:.3f} of their written training "
              "answers are right")
        prompts = [r["messages"][0]["content"] for r in s["held"]]
        student = {**json.loads(a.student), "block_size": lmkit.QA_LENGTH}
        results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in a.variants.split(",")}
        for seed in map(int, a.seeds.split(",")):
            for v in results:
                store, alpha = VARIANTS[v]
                run = work / f"run_{v}_{seed}"
                shutil.rmtree(run, ignore_errors=True)
                t0 = time.perf_counter()
                cli("train", "--store", str(work / store), "--student", "gpt", "--arch-kwargs", json.dumps(student),
                    "--epochs", str(a.epochs), "--alpha", str(alpha), "--seed", str(seed), "--batch-size",
                    str(a.batch), "--lr", str(a.lr), "--out", str(run))
                cli("export", str(run), "--format", "transformers")
                got = student_answers(run / "export" / "transformers", prompts)
                results[v].append((exact(got, s["held"]), exact(got, s["held"], "sum"),
                                   exact(got, s["held"], "reverse")))
                print(f"  seed {seed} ({v}) {store:7s} α {alpha:g}: exact match {results[v][-1][0]:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"\nstudents (GPT {a.student}, {a.epochs} epochs, batch {a.batch}, lr {a.lr:g}), exact match on {len(prompts)} held-out prompts, "
              f"mean ± std over seeds {a.seeds}:")
        for v, rs in results.items():
            store, alpha = VARIANTS[v]
            col = list(zip(*rs))
            sd = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in col]
            print(f"  ({v}) {store:7s} answers, α {alpha:g}: {statistics.mean(col[0]):.3f} ± {sd[0]:.3f}   "
                  f"(sums {statistics.mean(col[1]):.3f} ± {sd[1]:.3f}, reversals {statistics.mean(col[2]):.3f} ± "
                  f"{sd[2]:.3f})")
        for v, rs in results.items():
            print(f"chat_exact_match_{v}: {statistics.mean(r[0] for r in rs):.3f}")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
