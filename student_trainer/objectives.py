"""Training objectives: named pure functions with one signature, which the recipe composes from config.

Every objective is ``fn(step: Step) -> Tensor`` (a scalar, the mean over the batch's rows). A
:class:`Step` carries all an objective may read: the student's logits, the batch (stored targets in
whichever form the store holds, hard labels, a mixed view's partner and λ, stored teacher features),
the student's captured layers after their trainable heads (``heads``), the run's loss options and the
store's re-temperature plan. Objectives never touch the optimiser, the device or the run folder.

An objective may bring trainable parts: *heads* on named student layers (the hint regressor). The
recipe builds them once from the first batch's shapes, trains them with the student (same optimiser,
same DDP wrapper), saves them in the checkpoint and leaves them out of the exported student.

=========  ==========================================================================  =============
name       loss                                                                        store needs
=========  ==========================================================================  =============
``kl``     Hinton's ``α·T²·KL(p‖q) + (1−α)·CE``; a sparse store's targets go through   any targets
           the top-k (bucket or spread) or sampled estimate (:mod:`.losses`)
``mse``    ``α·MSE(centred logits) + (1−α)·CE`` (Ba & Caruana's logit matching)         dense targets
``ce``     hard labels only (the floor every distilled student is compared with)     labels
``hint``   FitNets' hint: ``½·mean((r(v) − u)²)``, ``v`` the student's guided layer,  teacher features
           ``r`` its regressor head, ``u`` the teacher's stored hint features
=========  ==========================================================================  =============

To add an objective: write its function and register it in :data:`OBJECTIVES` with what it needs;
add its name to ``TrainConfig.loss``. The recipe changes only if the objective needs a new kind of
input.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from darkstore.errors import SpecError

from . import losses
from .loader import Batch
from storage.forms import form_of

from .forms import SoftTerm


@dataclass(frozen=True)
class Step:
    """What an objective sees of one training step."""
    student: torch.Tensor  # [B, C] the student's logits, float32
    batch: Batch
    alpha: float
    soft: SoftTerm | None  # the run's soft term: the store's form read at T (None: no objective reads targets)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # student layer -> its head's output


def kd(step: Step) -> torch.Tensor:
    """Hinton's loss against whatever targets the store holds, decoded and compared by its form (:mod:`.forms`)."""
    b, soft = step.batch, step.soft
    per_row = soft(step.student, soft.decode(b.stored()))
    return losses.mix(per_row, losses.hard_ce_mixed(step.student, b.labels, b.mix_labels, b.mix_lam), b.labels,
                      step.alpha)


def mse(step: Step) -> torch.Tensor:
    b = step.batch
    return losses.logit_mse_loss(step.student, b.logits.float(), b.labels, alpha=step.alpha, labels2=b.mix_labels,
                                 lam=b.mix_lam)


def ce(step: Step) -> torch.Tensor:
    """Hard labels only; unlabeled rows contribute nothing (and the mean is over labeled rows)."""
    b = step.batch
    per_row = losses.hard_ce_mixed(step.student, b.labels, b.mix_labels, b.mix_lam)
    return per_row.sum() / (b.labels >= 0).sum().clamp(min=1)


def hint(step: Step) -> torch.Tensor:
    """FitNets' hint loss, summed over the hinted layers (one, usually)."""
    feats = step.batch.features or {}
    total = step.student.new_zeros(())
    for name, got in step.heads.items():
        total = total + losses.hint_loss(got, feats[name])
    return total


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[[Step], torch.Tensor]
    doc: str
    needs: str = "targets"  # "targets" | "logits" (every class's value) | "labels" | "features" | "positions"

    def check(self, meta: Any, path: Any) -> None:
        """Refuse a store this objective cannot learn from, before anything trains."""
        if self.needs == "positions" and meta.kind.length(meta) is None:
            raise SpecError(f"--loss {self.name} is built for per-token targets (a store of token sequences); "
                            f"{path} holds {meta.kind.name} (use --loss kl)")
        if self.needs == "logits" and not form_of(meta).every_class:
            raise SpecError(f"--loss {self.name} matches logits and needs dense targets; {path} holds "
                            f"{meta.targets} targets (use --loss kl)")
        if self.needs == "features" and not meta.features:
            raise SpecError(f"--loss {self.name} needs teacher features in the store; {path} keeps none "
                            "(generate with --keep-features TEACHER:LAYER)")


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("kl", kd, "Hinton's KD against the stored targets (dense, top-k or sampled)"),
    Objective("mse", mse, "logit matching against dense stored logits", needs="logits"),
    Objective("ce", ce, "hard labels only", needs="labels"),
    Objective("hint", hint, "FitNets' hint: regress a student layer onto stored teacher features", needs="features"),
    # language models' divergences: their loss is student_trainer.token_losses (the LM recipe computes it)
    Objective("reverse_kl", kd, "KL(q ‖ p) against per-token targets (sequence stores)", needs="positions"),
    Objective("jsd", kd, "the Jensen-Shannon divergence against per-token targets (sequence stores)",
              needs="positions"),
)}


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise SpecError(f"unknown objective {name!r}; objectives: {', '.join(OBJECTIVES)}") from None



# --- trainable parts: heads on student layers --------------------------------------------------------------
def regressor(student_shape: Sequence[int], target_shape: Sequence[int]) -> nn.Module:
    """FitNets' regressor from a student layer's per-row output to the stored hint's shape: for a [C, H, W]
    hint, adaptive average pooling of a [C', H', W'] student layer to H x W and a 1x1 convolution (FitNets'
    convolutional regressor, sized for any student); for a flat hint, pooling to 1 x 1 (convolutional
    layers) or flattening, then a linear map."""
    s, t = list(student_shape), list(target_shape)
    if len(t) == 3:
        if len(s) != 3:
            raise SpecError(f"the hint is [C, H, W] = {t}; the student layer gives {s} per row: guide a "
                            "convolutional layer, or store the hint projected (--feature-project)")
        return nn.Sequential(nn.AdaptiveAvgPool2d((t[1], t[2])), nn.Conv2d(s[0], t[0], kernel_size=1))
    flat = math.prod(t)
    if len(s) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(s[0], flat), nn.Unflatten(1, t))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(s), flat), nn.Unflatten(1, t))


class WithHeads(nn.Module):
    """The student plus trainable heads on some of its layers: ``forward(x)`` returns the student's output
    and ``{name: head(layer output)}``, captured with forward hooks while the student runs unchanged. One
    module, so DDP synchronises the heads' gradients with the student's. ``heads_on`` off (a stage that
    does not use them) skips the heads."""

    def __init__(self, student: nn.Module, layers: dict[str, str], heads: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.names = list(layers)
        self.heads = nn.ModuleList(heads[n] for n in self.names)
        self.heads_on = bool(self.names)
        self._seen: dict[str, torch.Tensor] = {}
        for n in self.names:
            student.get_submodule(layers[n]).register_forward_hook(self._hook(n))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.heads_on:
                self._seen[name] = output
        return hook

    def forward(self, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        self._seen = {}
        out = self.student(x)
        seen, self._seen = self._seen, {}
        if not self.heads_on:
            return out, {}
        return out, {n: h(seen[n]) for n, h in zip(self.names, self.heads)}


def student_layer_shape(model: nn.Module, layer: str, x: torch.Tensor) -> list[int]:
    """The per-row shape of ``model``'s ``layer`` output on inputs ``x`` (eval mode, no gradient)."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:16]) + (f" … ({len(names)} modules)" if len(names) > 16 else "")
        raise SpecError(f"the student has no layer {layer!r}; its modules: {shown}") from None
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was)
    if not seen or not isinstance(seen[0], torch.Tensor):
        raise SpecError(f"the student's layer {layer!r} did not return a tensor in its forward pass")
    return [int(v) for v in seen[0].shape[1:]]
