"""The library API for training in your own loop (Lightning, Accelerate, plain PyTorch): a store's soft targets,
streamed with their inputs, and Hinton's loss against them — the same loader, re-temperature and objective
``darkstore train`` uses, so a custom loop learns exactly what the CLI's does.

    from darkstore import SoftTargets

    targets = SoftTargets("stores/train", temperature=4.0)      # opens and checks the store and its inputs
    print(targets.describe())                                   # what re-temperature means for this store
    train_rows, eval_rows = targets.split(holdout=0.1)
    loader = targets.loader(train_rows, batch_size=128, seed=0)
    for epoch in range(1, 11):
        for batch in loader.epoch(epoch):                        # a resumable, sharded, shuffled epoch
            batch = batch.to(device)                             # recorded views are made there
            loss = targets.loss(model(batch.x), batch, alpha=0.9)
            ...

A language model's store (per-token targets) works the same way: ``batch.x`` is [B, L] token ids,
``batch.labels`` [B, L] the next tokens (−1 where no loss), and :meth:`SoftTargets.loss` takes the student's
[B, L, V] logits (or, memory-bounded, :meth:`SoftTargets.loss_from_hidden` its hidden states and output head).
:meth:`SoftTargets.fields` gives a batch as a dict (``input_ids``, ``labels`` and the stored targets) for loops
that pass dicts around, such as a Hugging Face ``Trainer``; ``loss`` takes that dict too.

Names here are the stable surface; everything they call may change between releases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from darkstore.data import TransferSet
from darkstore.transfer import open_transfer_set
from darkstore.fingerprint import FingerprintPolicy
from storage import StoreReader, open_store

from . import losses, token_losses
from .kinds import default_temperature, student_kind
from .forms import soft_term
from .loader import Batch, StudentLoader, make_loader
from .retemper import plan


class SoftTargets:
    """A store's targets at one temperature, with the transfer set they belong to.

    ``store``: a path or URL (``allow_incomplete``: train on the committed part of an unfinished store).
    ``data``: the transfer set (default: the one the store records), checked against the store's fingerprint.
    ``temperature``: the T of the soft term; the store's re-temperature plan says how exactly its targets give
    the teachers' distribution at that T (:meth:`describe`). ``members``: re-temperature from each member's
    kept logits when the store has them (exact for arithmetic means); default as the trainer chooses.
    ``temperature`` defaults as ``darkstore train``'s does: 4 for classes, 1 for a language model's store (a
    sampled store's own T)."""

    def __init__(self, store: str | Path | StoreReader, *, temperature: float | None = None,
                 data: TransferSet | str | Path | dict | None = None, allow_incomplete: bool = False,
                 allow_code: bool = False, roots: Sequence[str | Path] | None = None,
                 members: bool | None = None, fingerprints: FingerprintPolicy | None = None):
        self.reader = store if isinstance(store, StoreReader) else open_store(store, allow_incomplete=allow_incomplete)
        self.meta = self.reader.meta
        self.allow_code, self.roots = allow_code, roots
        if data is not None and not isinstance(data, TransferSet):
            data = open_transfer_set(data, allow_code=allow_code, roots=roots, fingerprints=fingerprints)
        self.kind = student_kind(self.meta)
        self.data = self.kind.open_data(self.reader, data, allow_code=allow_code, roots=roots,
                                        fingerprints=fingerprints)  # None: the rows' inputs are in the store
        self.temperature = float(default_temperature(self.meta) if temperature is None else temperature)
        self.plan = plan(self.meta, self.temperature, use_members=members)

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def describe(self) -> str:
        """What the soft term's targets are at this T: exact, or what the store's form gives instead."""
        return self.plan.describe()

    def split(self, holdout: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, eval rows): the store's committed rows with a fixed, seeded holdout (in a views store by
        sample, evaluating the held-out samples' clean views), as ``darkstore train`` splits them."""
        return self.kind.split(self.reader, holdout, None, self.data)[:2]

    def loader(self, rows: np.ndarray | None = None, *, batch_size: int = 128, seed: int = 0, shuffle: bool = True,
               num_workers: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
               views_per_epoch: int | None = None, pin_memory: bool = False,
               device: str | torch.device | None = None) -> StudentLoader:
        """Batches of ``rows`` (default: every committed row) with their inputs, hard labels and stored targets:
        ``loader.epoch(e)`` yields :class:`Batch` es (``x``, ``labels``, ``logits`` or sparse fields,
        ``mix_labels``/``mix_lam`` for mixed views); ``state_dict()``/``load_state_dict()`` resume mid-epoch.
        ``rank``/``world_size`` shard it for DDP. ``device``: a views store's views are made on that device when
        a batch moves there (``batch.to(device)``) instead of in the loader."""
        rows = self.reader.finished_rows() if rows is None else np.asarray(rows, dtype=np.int64)
        replay = None if device is None or torch.device(device).type == "cpu" else str(device)
        return make_loader(self.reader, rows, data=self.data, batch_size=batch_size, seed=seed, shuffle=shuffle,
                           num_workers=num_workers, rank=rank, world_size=world_size, drop_last=drop_last,
                           members=self.plan.needs_members, views_per_epoch=views_per_epoch, pin_memory=pin_memory,
                           allow_code=self.allow_code, roots=self.roots, replay_device=replay)

    def teacher_logp(self, batch: Batch) -> torch.Tensor:
        """[B, C] the teachers' log-probabilities at this T for a dense store's batch (re-temperatured)."""
        if batch.logits is None:
            raise ValueError("this store keeps sparse targets: use loss(), which knows their form")
        return self.plan(batch.logits.float(), None if batch.members is None else batch.members.float())

    def teacher_argmax(self, batch: Batch) -> torch.Tensor:
        """[B] the teachers' top class (any target form), e.g. for agreement; a language model's store: [B, L]
        their most likely next token at every position (a sampled store: the most drawn one)."""
        return self.kind.teacher_argmax(batch, self.meta)

    def fields(self, batch: Batch) -> dict[str, torch.Tensor]:
        """A language model's batch as a dict: ``input_ids`` [B, L], ``labels`` [B, L] (−1: no loss) and the
        stored target fields by name (what :meth:`loss` also takes)."""
        return {"input_ids": batch.x, "labels": batch.labels, **batch.stored()}

    def loss(self, student_logits: torch.Tensor, batch: Batch, *, alpha: float = 0.9,
             topk_loss: str = "bucket") -> torch.Tensor:
        """Hinton's ``α·T²·KL(teachers ‖ student) + (1−α)·CE`` over the batch — what ``darkstore train --loss kl``
        minimises, for any target form (dense, top-k, sampled) and mixed views; at α = 0 labeled rows take the
        hard-label term alone (unlabeled rows always take the soft term). A language model's store: the
        student's [B, L, V] logits, the mean over positions with a loss (:meth:`loss_from_hidden`)."""
        return self.kind.loss(self, student_logits, batch, alpha=alpha, topk_loss=topk_loss)

    def loss_from_hidden(self, hidden: torch.Tensor, head, batch: Batch | dict[str, torch.Tensor], *,
                         alpha: float = 0.9, topk_loss: str = "bucket", divergence: str = "forward") -> torch.Tensor:
        """A language model's per-token loss, what ``darkstore train`` minimises: the mean over positions with
        a loss of ``α·T²·D(teachers, student) + (1−α)·CE(next token)``, from the student's hidden states
        [B, L, H] and its output ``head`` ([n, H] -> [n, V]), made a slice of positions at a time so that
        [B, L, V] logits never exist whole. ``divergence``: forward (KL), reverse or jsd
        (:mod:`student_trainer.token_losses`). ``batch``: a :class:`Batch` or :meth:`fields`' dict."""
        if self.meta.kind.length(self.meta) is None:
            raise ValueError("loss_from_hidden is for a store of token sequences; use loss() for classes")
        labels = batch["labels"] if isinstance(batch, dict) else batch.labels
        stored = ({k: v for k, v in batch.items() if k not in ("input_ids", "labels")} if isinstance(batch, dict)
                  else batch.stored())
        soft = soft_term(self.meta, self.plan, topk_loss=topk_loss, divergence=divergence)
        return token_losses.sliced_loss(hidden, head, labels, soft.decode(stored) if alpha else {},
                                        vocab=self.meta.sequence.tokenizer.vocab_size, soft=soft, alpha=alpha)


kd_loss = losses.kd_loss
soft_kl = losses.soft_kl

__all__ = ["Batch", "SoftTargets", "StudentLoader", "kd_loss", "soft_kl"]
