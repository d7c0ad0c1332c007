"""Teachers writing responses: darkstore's decoding against the bound and against ``transformers``' own
``generate``, and the whole CLI process.

    ./dev bench responses [--prompts 64 --batch 16 --new 64 --width 512 --layers 4 --rounds 3]

Real text on every machine: the prompts are questions about the Python standard library's ``json`` functions,
rendered with ChatML by a byte-level BPE tokenizer trained on the library's sources (``--vocab`` tokens and
ChatML's two). Random-weight models (speed does not depend on what the weights learned). Side by side in one
run, the variants interleaved round by round; each ratio is the median of the paired ratios, with their range.

- ``ensemble``: two built-in GPTs (``--layers`` of ``--width``) writing ``--new`` tokens per response to
  ``--prompts`` prompts, batches of ``--batch`` rows, top-32 targets (``run_response_chunks`` into a fresh store,
  in-process) against the *bound*: each member's prefill and cached decode steps (with its head) over the same
  batches for as many steps, nothing combined, drawn or written. ``lm_decode_efficiency`` is bound / darkstore.
- ``hf``: one ``transformers`` GPT-2 of the same shape through darkstore (as above, one member) against
  ``model.generate(do_sample=True, top_p=0.95)`` on the same left-padded batches, ``--new`` tokens each, the
  same EOS. ``decode_vs_hf_generate`` is generate's time / darkstore's (above 1: darkstore faster, and it also
  writes the targets and the store).
- ``cli``: the ensemble job as a whole ``darkstore generate`` process (imports, checks, the store) against the
  bound: ``cli_decode_efficiency``.

Last lines: ``lm_decode_efficiency: <ratio>`` and ``decode_vs_hf_generate: <ratio>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import machine, paired_ratio

from darkstore.lm import LanguageModel
from darkstore_app import lmkit
from teacher_service.generate import open_for, prepare, run_chunks
from teacher_service.prepared import in_store_order
from teacher_service.spec import JobSpec

FUNCTIONS = ("dumps", "loads", "dump", "load", "JSONEncoder", "JSONDecoder", "JSONDecodeError", "encode",
             "decode", "raw_decode", "default", "iterencode")


def kit(work: Path, a) -> dict:
    """Tokenizer, prompts and models in ``work``."""
    base = lmkit.train_tokenizer(sorted((lmkit.stdlib() / "json").glob("*.py")), work / "base", a.vocab)
    tok = lmkit.chat_tokenizer(base, work / "tok")
    vocab = a.vocab + 2
    asks = [{"messages": [{"role": "user", "content": f"What does json.{FUNCTIONS[i % len(FUNCTIONS)]} do? "
                                                      f"Answer in {1 + i % 4} sentences."}]}
            for i in range(a.prompts)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in asks))
    cfg = {"block_size": a.length + 1, "n_layer": a.layers, "n_head": a.width // 64, "n_embd": a.width}
    gpts = [lmkit.gpt_teacher(work / f"gpt{i}.safetensors", vocab, seed=i, **cfg) for i in range(2)]
    gpt2 = lmkit.gpt2_teacher(work / "gpt2", vocab, seed=3, n_positions=a.length + 1, n_embd=a.width,
                              n_layer=a.layers, n_head=a.width // 64)
    sharpen(work, gpts, a.sharpen)
    return {"tok": tok, "gpts": [dict(m, weights=str(work / m["weights"])) for m in gpts],
            "gpt2": dict(gpt2, weights=str(work / "gpt2")), "prompts": work / "prompts.jsonl"}


def sharpen(work: Path, gpts: list[dict], gain: float) -> None:
    """Scale the final norm's gain of every teacher by ``gain``: random weights give nearly uniform
    distributions (entropy ≈ log V), a trained LM's are peaked (1–3 nats); what a nucleus costs depends on it."""
    from safetensors.torch import load_file, save_file

    for f in [work / m["weights"] for m in gpts] + [work / "gpt2" / "model.safetensors"]:
        state = load_file(f)
        for name in ("ln_f.weight", "transformer.ln_f.weight"):
            if name in state:
                state[name] = state[name] * gain
        save_file(state, f, metadata={"format": "pt"})


@torch.inference_mode()
def entropy(prepared, shaped: list) -> float:
    """The ensemble's mean entropy (nats) at the prompts' first written position."""
    from teacher_service.combine import combine

    out = []
    for x, valid in shaped:
        z = torch.stack([m.logits(m.start(x, valid, x.shape[1] + 1)[0]) for m in prepared.members])
        p = torch.log_softmax(combine(z, prepared.meta.combine, 1.0).double(), -1)
        out.append(-(p.exp() * p).sum(-1))
    return float(torch.cat(out).mean())


def job(path: Path, k: dict, members: list, a) -> Path:
    path.write_text(yaml.safe_dump({
        "teachers": {"members": members}, "targets": "topk:32", "chunk_rows": a.batch,
        "data": {"kind": "text", "root": str(k["prompts"]), "format": "jsonl", "tokenizer": str(k["tok"]),
                 "length": a.length, "packing": "chat"},
        "responses": {"max_new_tokens": a.new, "temperature": 1.0, "top_p": 0.95, "seed": 1}}))
    return path


def darkstore(prepared, out: Path, a) -> float:
    """The prepared job's responses and targets written into a fresh store (loading and checks excluded)."""
    shutil.rmtree(out, ignore_errors=True)
    writer = open_for(prepared, out)
    t0 = time.perf_counter()
    run_chunks(prepared, writer, writer.pending_chunks(), batch_size=a.batch)
    return time.perf_counter() - t0


def batches(prepared, a) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The job's prompts in its batches (its store's row order, sorted by prompt length within a chunk),
    left-padded."""
    data = in_store_order(prepared.data, prepared.meta)
    out = []
    for b0 in range(0, len(data), a.batch):
        tokens, plen = (t.numpy() for t in data.get_batch(np.arange(b0, min(b0 + a.batch, len(data)))))
        order = np.argsort(plen, kind="stable")
        tokens, plen = tokens[order], plen[order]
        width = int(plen.max())
        x = np.zeros((len(plen), width), dtype=np.int64)
        for j, n in enumerate(plen):
            x[j, width - n:] = tokens[j, :n]
        valid = np.arange(width)[None] >= (width - plen)[:, None]
        out.append((torch.from_numpy(x), torch.from_numpy(valid)))
    return out


@torch.inference_mode()
def bound(members: list[LanguageModel], shaped: list, steps: int, vocab: int) -> float:
    """Each member's prefill and ``steps`` cached steps with its head over the same batches; nothing else."""
    t0 = time.perf_counter()
    for x, valid in shaped:
        token = torch.zeros(len(x), dtype=torch.long)
        for m in members:
            h, state = m.start(x, valid, x.shape[1] + steps)
            for s in range(steps):
                m.logits(h)[..., :vocab]
                if s + 1 < steps:
                    h = m.step(token, state)
    return time.perf_counter() - t0


@torch.inference_mode()
def hf_generate(model, shaped: list, a, eos: int) -> float:
    t0 = time.perf_counter()
    for x, valid in shaped:
        model.generate(input_ids=x, attention_mask=valid.long(), do_sample=True, top_p=0.95, top_k=0,
                       temperature=1.0, max_new_tokens=a.new, eos_token_id=eos, pad_token_id=eos)
    return time.perf_counter() - t0


def cli(path: Path, out: Path, a) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", "generate", "--job", str(path), "--out", str(out),
                        "--batch-size", str(a.batch)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return time.perf_counter() - t0


def written_steps(out: Path) -> float:
    """Mean written tokens per response of a finished store (how many steps the bound should take)."""
    from storage import open_store

    r = open_store(out)
    return float(r.group["stats"][:][:, 0].sum()) / r.meta.num_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sharpen", type=float, default=10.0, help="the teachers' final-norm gain (see sharpen)")
    a = p.parse_args()
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="darkstore-bench-responses-"))
    try:
        k = kit(work, a)
        ens = JobSpec.from_file(job(work / "ensemble.yaml", k, k["gpts"], a))
        one = JobSpec.from_file(job(work / "one.yaml", k, [k["gpt2"]], a))
        prep_e, prep_o = prepare(ens), prepare(one)
        shaped = batches(prep_e, a)
        vocab = prep_e.meta.num_classes
        hf = prep_o.members[0].module
        eos = prep_o.data.tokenizer.eos_id
        darkstore(prep_e, work / "warm", a)  # first-touch allocations
        steps = round(written_steps(work / "warm"))
        te, tb, to, th, tc, tb2 = [], [], [], [], [], []
        for _ in range(a.rounds):
            te.append(darkstore(prep_e, work / "e", a))
            tb.append(bound(prep_e.members, shaped, a.new, vocab))
            to.append(darkstore(prep_o, work / "o", a))
            th.append(hf_generate(hf, shaped, a, eos))
            tc.append(cli(work / "ensemble.yaml", work / "c", a))
            tb2.append(bound(prep_e.members, shaped, a.new, vocab))
        n = a.prompts * written_steps(work / "e")
        eff, lo, hi = paired_ratio(tb, te)
        vs, vlo, vhi = paired_ratio(th, to)
        ceff, clo, chi = paired_ratio(tb2, tc)
        print(f"{a.prompts} prompts, batches of {a.batch}, {a.new} new tokens each (mean written {n / a.prompts:.1f}; "
              f"the bound takes {a.new} steps), V {vocab:,}, GPTs of {a.layers} layers × {a.width}, top-32, "
              f"{a.rounds} rounds (warm-up wrote {steps} a response); the ensemble's entropy "
              f"{entropy(prep_e, shaped):.2f} nats, one GPT-2's {entropy(prep_o, shaped):.2f} (--sharpen {a.sharpen:g})")
        print(f"  ensemble of 2, darkstore in-process {n / np.median(te):8,.0f} tokens/s")
        print(f"  bound (2 members' cached steps)     {n / np.median(tb):8,.0f} tokens/s   bound / darkstore "
              f"{eff:.3f} (range {lo:.3f}–{hi:.3f})")
        print(f"  ensemble, whole CLI process         {n / np.median(tc):8,.0f} tokens/s   bound / CLI "
              f"{ceff:.3f} (range {clo:.3f}–{chi:.3f})")
        print(f"  one GPT-2 through darkstore         {n / np.median(to):8,.0f} tokens/s")
        print(f"  transformers generate (sampling)    {a.prompts * a.new / np.median(th):8,.0f} tokens/s   "
              f"generate / darkstore {vs:.3f} (range {vlo:.3f}–{vhi:.3f})")
        print(f"cli_decode_efficiency: {ceff:.3f}")
        print(f"lm_decode_efficiency: {eff:.3f}")
        print(f"decode_vs_hf_generate: {vs:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
