"""Dense targets: every class's value (``logits``). Re-temperature depends on the combine rule only
(``student_trainer.retemper``)."""

from __future__ import annotations

import numpy as np

from darkstore.errors import SpecError

from ..fieldspec import FieldSpec
from .base import Form


class Dense(Form):
    name = "dense"
    logp_source = "the stored targets (exact)"
    every_class = True

    def check_job(self, targets, *, combine, temperature, keep_members, num_classes):
        pass
    fields = (
        FieldSpec("logits", ("row", "class"), lambda m: (m.num_rows, m.num_classes), lambda m: m.dtype, np.nan,
                  lambda m: m.target_form == "dense", target=True, log_space=True, per_position=True,
                  doc="ensemble targets in log space, centred (row max 0)", when="dense targets"),
    )

    def target_bytes(self, meta) -> int:
        return meta.item_bytes * meta.num_classes

    def encode(self, ell, meta, uniforms=None, log_z=None):
        return {"logits": ell - ell.amax(-1, keepdim=True)}

    def decode(self, parts, meta):
        out = {"logits": parts["logits"].float()}
        if parts.get("members") is not None:
            out["members"] = parts["members"].float()
        return out

    def top1(self, parts, meta):
        return parts["logits"].float().argmax(-1)

    def teacher_logp(self, parts, meta):
        import torch

        return torch.log_softmax(parts["logits"].float(), dim=-1)

    def top_logprobs(self, parts, meta, k):
        """The ``k`` largest of every class's log-probability (k must be given: dense targets keep them all)."""
        import torch

        if k is None:
            raise SpecError(f"dense targets keep all {meta.num_classes:,} values: say how many to write (--k)")
        if not 0 < k < meta.num_classes:
            raise SpecError(f"--k {k}: give 1 to {meta.num_classes - 1} (fewer than the {meta.num_classes:,} "
                            "classes kept)")
        logp = torch.log_softmax(parts["logits"].double(), dim=-1)
        head, idx = logp.topk(k, dim=-1)
        rest = logp.scatter(-1, idx, float("-inf"))
        return idx, head, torch.logsumexp(rest, dim=-1)
