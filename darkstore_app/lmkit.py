"""Language-model material every machine has: the Python standard library's source as a text corpus, a BPE
tokenizer trained on it locally, and small GPT teachers (the built-in one, and a ``transformers`` GPT-2 saved
to a local directory). The LM demo, benches and tests build from here; nothing is downloaded.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path
from typing import Any

import torch


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
    from darkstore.gpt import GPT
    from darkstore.models import save_weights

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

    from darkstore.gpt import GPT
    from darkstore.models import save_weights

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

    from darkstore.data import TextSpec
    from darkstore.text import TextSet

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
