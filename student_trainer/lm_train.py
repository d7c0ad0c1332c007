"""The recipe for language-model students: causal LMs trained on a sequence store's per-token targets.

Everything that is not about tokens is the class recipe's (:class:`student_trainer.recipe.Recipe`): the run
folder, checkpoints and mid-epoch resume, the loader (a sequence store's rows are their own inputs: the
stored tokens), lockstep groups of students that share batches, DDP, tracking. This module adds what differs:
the student (:func:`darkstore.lm.load_student`: the built-in GPT or a ``transformers`` causal LM), the per-token
objective (:mod:`.token_losses`, a slice of positions at a time), and the evaluation (:mod:`.lm_eval`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkstore.errors import SpecError
from darkstore.lm import LanguageModel, load_student
from darkstore.models import ModelSpec, count_params, save_weights
from storage import open_store

from . import token_losses
from .config import TOKEN_OPTIMISER
from .lm_eval import TokenEvalRows, check_eval_store, evaluate_tokens, lm_report, sequence_split
from .loader import window_chunks
from .recipe import Recipe, check_device, plan_stages
from .forms import soft_term
from .retemper import plan, unused

#: --loss for a sequence store -> the divergence of the soft term (ce: next-token cross-entropy only)
TOKEN_LOSSES = {"kl": "forward", "reverse_kl": "reverse", "jsd": "jsd", "ce": None}


class TokenStudent(nn.Module):
    """A causal-LM student as the recipe steps it: ``forward`` gives hidden states [B, L, H] (so that DDP sees
    the forward pass), :meth:`head` turns those of some positions into logits over the store's vocabulary (a
    wider head, vocabulary padding, is cut to it). No trainable heads of its own (``heads`` is empty)."""

    def __init__(self, lm: LanguageModel, vocab: int):
        super().__init__()
        self.student = lm.module
        self.lm, self.vocab = lm, vocab
        self.heads = nn.ModuleList()
        self.heads_on = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm.hidden(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.logits(h)[..., :self.vocab]






class LMRecipe(Recipe):
    """One language-model student's run (see the module docstring)."""

    optimiser_defaults = TOKEN_OPTIMISER
    stackable = False  # students step one by one (stacking is for the small class models)

    def setup_data(self, inputs) -> None:
        c, log = self.config, self.log
        check_device(c)
        self.inputs, self.reader, self.meta = inputs, inputs.reader, inputs.meta
        if c.loss not in TOKEN_LOSSES:
            raise SpecError(f"--loss {c.loss} is for stores of classes; a sequence store trains with "
                            f"{', '.join(TOKEN_LOSSES)}")
        self.divergence = TOKEN_LOSSES[c.loss]
        self.stages = plan_stages(c)
        self.hint_name = None
        uses_targets = self.divergence is not None and c.alpha > 0
        self.rt = plan(self.meta, c.temperature) if uses_targets else unused(c.temperature)
        self.soft = (soft_term(self.meta, self.rt, topk_loss=c.topk_loss, divergence=self.divergence)
                     if uses_targets else None)
        if log and uses_targets:
            log(f"targets: {self.rt.describe()}")
        self.data = self.ev_data = None
        self.has_eval_store = inputs.has_eval_store
        self.ev_reader = inputs.ev_reader or self.reader
        self.train_rows, self.ev_rows, self.eval_rows = inputs.split(c.holdout)
        device = self.setup_device()
        self.loader, self.mixing = inputs.loader(
            self.train_rows, log, batch_size=c.batch_size, seed=c.seed, shuffle=True, num_workers=c.num_workers,
            buffer_chunks=window_chunks(self.meta, c.shuffle_buffer_mb), rank=self.dist.rank,
            world_size=self.dist.world, pin_memory=device.startswith("cuda"))

    def setup_model(self) -> None:
        c, device = self.config, self.device
        torch.manual_seed(c.seed)
        seq = self.meta.sequence
        lm = load_student(c.student, seq.tokenizer, length=seq.length, allow_code=self.allow_code,
                          roots=self.roots)
        self.spec = c.student
        self.wrapped = TokenStudent(lm, seq.tokenizer.vocab_size).to(device)
        self.model = lm.module
        self.vocab = seq.tokenizer.vocab_size
        self.slice = token_losses.slice_positions(self.vocab)
        for note in lm.notes if self.log else ():
            self.log(f"student {c.student.label}: {note}")
        self.setup_steps(False)

    def step(self, b) -> None:
        """One optimiser step on a batch of token rows already on the device (inside :meth:`own_rng`)."""
        c = self.config
        alpha = c.alpha if self.soft is not None else 0.0
        targets = self.soft.decode(b.stored()) if alpha else {}
        with torch.autocast(self.dev_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            hidden = self.net(b.x)
            loss = token_losses.sliced_loss(hidden, self.wrapped.head, b.labels, targets, vocab=self.vocab,
                                            soft=self.soft, alpha=alpha)
        self.apply(loss, (b.labels >= 0).sum())  # a mean over the positions with a loss (counted on the device)

    def evaluate_now(self) -> dict[str, float]:
        return {k: v for k, v in self.evaluate_all().items() if not isinstance(v, str)}

    def evaluate_all(self) -> dict[str, Any]:
        """:func:`~student_trainer.lm_eval.evaluate_tokens` on the eval rows, where the teachers' figure came
        from included."""
        was = self.wrapped.training
        self.wrapped.eval()
        try:
            return evaluate_tokens(self.wrapped, self.wrapped.head, self.eval_rows, device=self.device,
                                   slice_positions=self.slice)
        finally:
            self.wrapped.train(was)

    def save_student(self) -> str:
        """``student.safetensors``; a ``transformers`` student also as a directory ``transformers`` loads
        (``student/``: config, safetensors weights and the store's tokenizer files)."""
        digest = save_weights(self.model, self.out / "student.safetensors")
        if self.wrapped.lm.kind == "transformers":
            folder = self.out / "student"
            self.model.save_pretrained(str(folder), safe_serialization=True)
            copy_tokenizer(self.meta.sequence.tokenizer.path, folder, self.meta.sequence.chat)
        return digest

    def epoch_extra(self, seen: float, seconds: float) -> dict[str, Any]:
        return {"tokens": int(seen), "tokens_per_second": seen / seconds if seconds else None}

    def final_report(self, latency: bool) -> dict[str, Any]:
        """eval.json (:func:`~student_trainer.lm_eval.lm_report`)."""
        return lm_report(self.evaluate_all(), self.ev_reader, self.ev_rows, params=count_params(self.model),
                         weights_path=self.out / "student.safetensors")

    def summary(self, digest: str) -> dict[str, Any]:
        seq = self.meta.sequence
        tokens = sum(r.get("tokens", 0) for r in self.history)
        seconds = sum(r.get("seconds", 0.0) for r in self.history)
        return {**super().summary(digest), "tokens": tokens,
                "tokens_per_second": tokens / seconds if seconds else None,
                "sequence": {"length": seq.length, "vocab_size": seq.tokenizer.vocab_size,
                             "tokenizer_fingerprint": seq.tokenizer.fingerprint},
                "loss_divergence": self.divergence, "target_form": self.meta.target_form,
                "topk_loss": self.config.topk_loss}


def copy_tokenizer(path: str, folder: Path, chat: Any = None) -> None:
    """The store's tokenizer files (``tokenizer.json``, ``tokenizer_config.json``) into ``folder``, so that
    ``AutoTokenizer`` loads it from there; with a chat store's record (``chat``), its template as the
    configuration's ``chat_template``, so that ``apply_chat_template`` renders conversations as the store did."""
    tok = Path(path)
    for f in (tok.glob("tokenizer*.json") if tok.is_dir() else [tok]):
        if f.is_file():
            shutil.copy(f, folder / f.name)
    if chat is not None:
        config = folder / "tokenizer_config.json"
        raw = json.loads(config.read_text()) if config.is_file() else {}
        config.write_text(json.dumps({**raw, "chat_template": chat.template}, indent=2) + "\n")


def load_run_lm(run: Path, summary: dict[str, Any], record, length: int, *, allow_code: bool = False
                ) -> TokenStudent:
    """A finished LM run's student, in eval mode: its spec with the run's weights (a transformers student from
    the saved ``student/`` directory)."""
    spec = ModelSpec.model_validate(summary["student"])
    weights = run / "student" if spec.format == "transformers" else run / "student.safetensors"
    lm = load_student(spec.model_copy(update={"weights": str(weights)}), record, length=length,
                      allow_code=allow_code)
    return TokenStudent(lm, record.vocab_size).eval()


def evaluate_lm_run(run: Path, summary: dict[str, Any], *, store=None, device: str = "cpu", write: bool = True,
                    allow_code: bool = False) -> dict[str, Any]:
    """``darkstore eval`` of a language-model run: its held-out rows (the eval store, or the same holdout it
    trained with), or every row of ``store`` (a sequence store of the same tokenizer)."""
    train_reader = open_store(summary["store"], allow_incomplete=True)
    if store is not None:
        reader = open_store(store)
        check_eval_store(train_reader.meta, reader.meta, reader.path)
        rows, whole = reader.finished_rows(), True
    else:
        ev = open_store(summary["eval_store"]) if summary.get("eval_store") else None
        _, rows = sequence_split(train_reader, summary.get("holdout") or 0.0, ev)
        reader, whole = ev or train_reader, ev is not None
    seq = train_reader.meta.sequence
    student = load_run_lm(run, summary, seq.tokenizer, seq.length, allow_code=allow_code).to(device)
    flat = evaluate_tokens(student, student.head, TokenEvalRows(reader, rows, whole_store=whole), device=device,
                           slice_positions=token_losses.slice_positions(seq.tokenizer.vocab_size))
    report = lm_report(flat, reader, rows, params=count_params(student.student),
                       weights_path=run / "student.safetensors")
    if write and store is None:
        (run / "eval.json").write_text(json.dumps(report, indent=2))
    return report
