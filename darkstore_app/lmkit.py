"""Language-model material every machine has: the Python standard library's source as a text corpus, a BPE
tokenizer trained on it locally, and small GPT teachers (the built-in one, and a ``transformers`` GPT-2 saved
to a local directory). The LM demo, benches and tests build from here; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch

from darkstore.data import TextSpec
from darkstore.gpt import GPT
from darkstore.models import save_weights
from darkstore.text import TextSet
from darkstore.transfer import open_transfer_set


def stdlib() -> Path:
    """The standard library's source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def train_tokenizer(files: list[Path], out: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained on ``files``, with ``<|endoftext|>`` as EOS, saved to ``out``
    (a directory holding tokenizer.json and tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}\n')
    return out


#: ChatML, as Qwen's and many other models' templates render conversations
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_tokenizer(base: Path, out: Path, template: str = CHATML) -> Path:
    """``base``'s tokenizer with ChatML's ``<|im_start|>`` and ``<|im_end|>`` added as special tokens, EOS
    ``<|im_end|>`` and ``template`` as its chat template, saved to ``out``."""
    import json

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template}, indent=1) + "\n")
    return out


def gpt_teacher(path: Path, vocab_size: int, *, seed: int = 0, **config: Any) -> dict[str, Any]:
    """A built-in GPT saved as safetensors; returns its member spec (relative to ``path``'s folder)."""

    torch.manual_seed(seed)
    save_weights(GPT(vocab_size, **config), path)
    return {"name": path.stem, "arch": "gpt", "arch_kwargs": config, "weights": path.name}


def gpt2_teacher(folder: Path, vocab_size: int, *, tokenizer: Path | None = None, seed: int = 0,
                 pad_vocab: int = 0, **config: Any) -> dict[str, Any]:
    """A transformers GPT-2 saved to ``folder`` (safetensors), its head ``pad_vocab`` tokens wider than the
    tokenizer as many published models are, with the tokenizer copied beside it; returns its member spec."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size + pad_vocab, bos_token_id=0, eos_token_id=0, **config)
    GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
    return {"name": folder.name, "format": "transformers", "weights": folder.name}


def split_corpus(out: Path, megabytes: float = 1.0, held_out: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """About ``megabytes`` of the standard library's ``.py`` files (tests and site-packages left out), drawn
    at random by file and copied into ``out/transfer`` and ``out/heldout`` (``held_out`` of the bytes): the
    held-out files are never seen by the teachers' generation."""
    import numpy as np

    files = sorted(p for p in stdlib().rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    rng = np.random.default_rng(seed)
    budget, taken = megabytes * 1e6, []
    for i in rng.permutation(len(files)):
        size = files[i].stat().st_size
        if 0 < size <= budget / 8:
            taken.append(files[i])
            budget -= size
            if budget <= 0:
                break
    dest = {name: out / name for name in ("transfer", "heldout")}
    cut = held_out * sum(p.stat().st_size for p in taken)
    for folder in dest.values():
        folder.mkdir(parents=True, exist_ok=True)
    for p in taken:
        side = "heldout" if cut > 0 else "transfer"
        cut -= p.stat().st_size if side == "heldout" else 0
        rel = p.relative_to(stdlib())
        shutil.copy(p, dest[side] / "__".join(rel.parts))
    return dest["transfer"], dest["heldout"]


def train_gpt(path: Path, rows: Any, vocab_size: int, *, steps: int = 300, batch: int = 32, lr: float = 3e-3,
              seed: int = 0, **config: Any) -> dict[str, Any]:
    """A built-in GPT trained on token ``rows`` [N, L + 1] (next-token cross-entropy, AdamW, a linear warm-up over
    a tenth of the steps then cosine decay) and
    saved as safetensors; returns its member spec. Minutes on a CPU at demo sizes."""
    import math

    import numpy as np
    import torch.nn.functional as F


    torch.manual_seed(seed)
    model = GPT(vocab_size, **config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    warm = max(1, steps // 10)  # a linear warm-up: without it small GPTs often stall on a plateau for a while
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * ((step + 1) / warm if step < warm else
                            0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
        b = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    save_weights(model, path)
    return {"name": path.stem, "arch": "gpt", "arch_kwargs": config, "weights": path.name}


def write_lm_example(root: Path, *, steps: int = 150, log=print) -> Path:
    """A ready-to-run language-model job in ``root``: the json package's sources as the corpus (copied), a
    512-token BPE tokenizer trained on them, two small built-in GPTs trained on them for ``steps`` steps, and
    job.yaml asking for top-32 targets at 64 positions per row. Returns the job file."""
    import yaml


    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for f in sorted((stdlib() / "json").glob("*.py")):
        shutil.copy(f, corpus / f.name)
    tok = train_tokenizer(sorted(corpus.glob("*.py")), root / "tokenizer", vocab_size=512)
    rows = TextSet(TextSpec(root=str(corpus), glob="*.py", tokenizer=str(tok), length=64), corpus, tok).rows.tokens
    members = []
    for i, size in enumerate(({"n_layer": 2, "n_head": 2, "n_embd": 64}, {"n_layer": 1, "n_head": 2, "n_embd": 96})):
        (root / "teachers").mkdir(exist_ok=True)
        m = train_gpt(root / "teachers" / f"gpt{i}.safetensors", rows, 512, steps=steps, seed=i, block_size=64,
                      **size)
        members.append({**m, "weights": f"teachers/{m['weights']}", "tokenizer": "tokenizer"})
        log(f"trained teacher gpt{i} ({size['n_layer']} layers, width {size['n_embd']}) for {steps} steps")
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({
        "teachers": {"members": members}, "targets": "topk:32",
        "data": {"kind": "text", "root": "corpus", "glob": "*.py", "tokenizer": "tokenizer", "length": 64}},
        sort_keys=False))
    return job


# --- a task with right answers, in conversations ---------------------------------------------------------
#: positions per row of the question-and-answer conversations (the longest is 36 tokens)
QA_LENGTH = 40


def qa_records(n: int, seed: int, avoid: set | None = None) -> list[dict]:
    """``n`` conversations with a right answer, half sums of two 2-digit numbers ("What is 37 + 48?" → "85"),
    half random words spelt backwards ("Reverse the letters of kqzt." → "tzqk"), none of whose questions is in
    ``avoid``; each record's ``kind`` says which."""
    rng = random.Random(seed)
    out, seen = [], set(avoid or ())
    while len(out) < n:
        if len(out) % 2 == 0:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            q, ans, kind = f"What is {a} + {b}?", str(a + b), "sum"
        else:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))
            q, ans, kind = f"Reverse the letters of {w}.", w[::-1], "reverse"
        if q in seen:
            continue
        seen.add(q)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
                    "kind": kind})
    return out


def qa_tokenizer(folder: Path, texts: list[str], vocab: int) -> Path:
    """Byte-level BPE trained on ``texts`` with digits split one by one, ChatML's tokens, its template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    return folder


def chat_data(path: Path, tok: Path, length: int = QA_LENGTH) -> dict:
    """A chat transfer set's data spec: JSON lines of conversations, rows of ``length`` positions."""
    return {"kind": "text", "root": str(path), "format": "jsonl", "tokenizer": str(tok), "length": length,
            "packing": "chat"}


def train_answer_gpt(path: Path, rows, mask, vocab: int, *, steps: int, seed: int, **config) -> dict:
    """A built-in GPT trained on the answers (the loss mask) of conversation rows ``rows`` [N, L + 1] (AdamW,
    a warm-up, cosine decay), saved as safetensors; returns its member spec."""
    import torch.nn.functional as F


    torch.manual_seed(seed)
    model = GPT(vocab, **config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    x, m = torch.as_tensor(rows), torch.as_tensor(mask).bool()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 200) * 0.5 * (1 + np.cos(np.pi * step / steps))
        b = torch.randint(len(x), (64,), generator=gen)
        logits = model(x[b, :-1])
        loss = F.cross_entropy(logits[m[b]], x[b, 1:][m[b]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    save_weights(model, path)
    return {"name": path.stem, "arch": "gpt", "arch_kwargs": config, "weights": str(path)}


def write_chat_example(root: Path, *, steps: int = 600, records: int = 2000, log=print) -> Path:
    """A ready-to-run example of conversations in ``root``: ``train.jsonl`` and ``held.jsonl`` (questions with a
    right answer: :func:`qa_records`), a tokenizer with ChatML's template trained on them, two small GPT teachers
    trained on the training answers for ``steps`` steps, ``job.yaml`` (the teachers write their answers to the
    training prompts, greedily, top-32 targets on each written token) and ``gold.yaml`` (the gold
    conversations scored by the same teachers). Returns the job file."""
    import yaml


    root.mkdir(parents=True, exist_ok=True)
    train = qa_records(records, seed=1)
    held = qa_records(max(1, records // 10), seed=2, avoid={r["messages"][0]["content"] for r in train})
    for name, recs in (("train", train), ("held", held)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = qa_tokenizer(root / "tokenizer", [m["content"] for r in train for m in r["messages"]], 400)
    data = open_transfer_set(chat_data(root / "train.jsonl", tok))
    (root / "teachers").mkdir(exist_ok=True)
    members = []
    for i in range(2):
        m = train_answer_gpt(root / "teachers" / f"gpt{i}.safetensors", data.rows.tokens, data.rows.mask,
                             data.tokenizer.vocab_size, steps=steps, seed=i, block_size=QA_LENGTH, n_layer=2,
                             n_head=2, n_embd=64)
        members.append({**m, "weights": f"teachers/gpt{i}.safetensors"})
        log(f"trained teacher gpt{i} on the training answers for {steps} steps")
    spec = {"kind": "text", "root": "train.jsonl", "format": "jsonl", "tokenizer": "tokenizer",
            "length": QA_LENGTH, "packing": "chat"}
    base = {"teachers": {"members": members}, "targets": "topk:32", "data": spec}
    (root / "gold.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({**base, "responses": {"max_new_tokens": 8, "temperature": 0}}, sort_keys=False))
    return job
