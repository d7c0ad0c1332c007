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
