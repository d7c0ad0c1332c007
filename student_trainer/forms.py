"""Target forms on the training side: what each stored form's soft term is, for every row kind.

:mod:`storage.forms` owns a form's fields, its encoding and its decoding (``Form.decode``: the values in
nats, whatever their stored encoding, with their indices and the tail). This module owns what training does
with the decoded targets: the soft term ``T² · D(p, q)`` at N rows or positions from the student's [N, C]
logits, registered by the storage form's name. A row of classes is one position, so the class students'
loss and the language models' per-token loss are the same function of the same decoded targets.

========  ============================================================  ========================
form      the teachers' side p at T                                     divergences
========  ============================================================  ========================
dense     the run's re-temperature plan of the stored logits            forward, reverse, jsd
          (:mod:`.retemper`: exact, or what it gives instead)
top-k     ``bucket``: the k kept classes one by one and one "other"     forward, reverse, jsd
          bucket; ``spread``: the tail's mass spread evenly
sampled   ``−(1/k) Σ log q(index_j)``, the unbiased estimate of the     forward
          cross-entropy at the temperature drawn at
========  ============================================================  ========================

Adding a form: its storage module (fields, encode, decode) and a :class:`FormLoss` here, in :data:`LOSSES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from darkstore.errors import SpecError
from storage.forms import FORMS, Dense, Form, Sampled, TopK, form_of

from . import losses
from .retemper import Retemper

#: how a top-k store's tail is read: one "other" bucket, or its mass spread evenly over the classes left out
TOPK_LOSSES = ("bucket", "spread")


class FormLoss:
    """The soft term of one stored form, given its decoded targets (``Form.decode``)."""

    divergences: tuple[str, ...] = losses.DIVERGENCES

    def logps(self, student: torch.Tensor, targets: dict[str, torch.Tensor], *, plan: Retemper,
              topk_loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's and the student's log-probabilities at the plan's T, over what the form compares."""
        raise NotImplementedError

    def soft(self, student: torch.Tensor, targets: dict[str, torch.Tensor], *, plan: Retemper,
             topk_loss: str = "bucket", divergence: str = "forward") -> torch.Tensor:
        """[N] ``T² · D(p, q)`` at N rows (positions): ``student`` [N, C] logits, ``targets`` decoded [N, ...]."""
        logp, logq = self.logps(student, targets, plan=plan, topk_loss=topk_loss)
        return plan.temperature ** 2 * losses.divergence(logp, logq, divergence)


def _student_logq(student: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(student.to(torch.promote_types(student.dtype, torch.float32)) / temperature, dim=-1)


class DenseLoss(FormLoss):
    def logps(self, student, targets, *, plan, topk_loss):
        return plan(targets["logits"], targets.get("members")), _student_logq(student, plan.temperature)


class TopKLoss(FormLoss):
    def logps(self, student, targets, *, plan, topk_loss):
        t = plan.temperature
        if topk_loss == "bucket":
            return losses.bucket_logps(student, targets["index"], targets["head"], targets["tail"], t)
        teacher = losses.topk_teacher_logp(targets["index"], targets["head"], targets["tail"], student.shape[-1], t)
        return teacher, _student_logq(student, t)


class SampledLoss(FormLoss):
    divergences = ("forward",)

    def soft(self, student, targets, *, plan, topk_loss="bucket", divergence="forward"):
        if divergence not in self.divergences:
            raise ValueError("sampled targets estimate the forward KL only (a sample says nothing of log p)")
        return losses.sampled_ce(student, targets["index"], plan.temperature)


#: every form's training side, by the storage form's name
LOSSES: dict[str, FormLoss] = {Dense.name: DenseLoss(), TopK.name: TopKLoss(), Sampled.name: SampledLoss()}
assert LOSSES.keys() == FORMS.keys(), "every storage form needs its training side"


@dataclass(frozen=True)
class SoftTerm:
    """One run's soft term: its store's form, the re-temperature plan, and the options that read it.
    ``decode(fields)`` turns a batch's stored target fields into what ``self(student, targets)`` compares."""

    form: Form
    loss: FormLoss
    meta: Any
    plan: Retemper
    topk_loss: str = "bucket"
    divergence: str = "forward"

    @property
    def temperature(self) -> float:
        return self.plan.temperature

    def decode(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.form.decode(fields, self.meta)

    def __call__(self, student: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss.soft(student, targets, plan=self.plan, topk_loss=self.topk_loss, divergence=self.divergence)


def soft_term(meta: Any, plan: Retemper, *, topk_loss: str = "bucket", divergence: str = "forward") -> SoftTerm:
    """The soft term of a store of ``meta``'s form under ``plan``; refuses a divergence the form cannot give."""
    form = form_of(meta)
    loss = LOSSES[form.name]
    if topk_loss not in TOPK_LOSSES:
        raise SpecError(f"topk_loss {topk_loss!r}: choose one of {', '.join(TOPK_LOSSES)}")
    if divergence not in loss.divergences:
        raise SpecError(f"the {divergence} divergence cannot be had from {meta.targets} targets: they estimate "
                        f"the {' or '.join(loss.divergences)} KL only (--loss kl); reverse KL and JSD need the "
                        "teachers' probabilities: a top-k or dense store")
    return SoftTerm(form, loss, meta, plan, topk_loss, divergence)
