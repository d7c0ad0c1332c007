"""Dense targets: every class's value (``logits``). Re-temperature depends on the combine rule only
(``student_trainer.retemper``)."""

from __future__ import annotations

import numpy as np

from ..fieldspec import FieldSpec
from .base import Form


class Dense(Form):
    name = "dense"
    fields = (
        FieldSpec("logits", ("row", "class"), lambda m: (m.num_rows, m.num_classes), lambda m: m.dtype, np.nan,
                  lambda m: m.target_form == "dense", target=True, log_space=True, per_position=True,
                  doc="ensemble targets in log space, centred (row max 0)", when="dense targets"),
    )

    def target_bytes(self, meta) -> int:
        return meta.item_bytes * meta.num_classes

    def encode(self, ell, meta, uniforms=None, log_z=None):
        return {"logits": ell - ell.amax(-1, keepdim=True)}

    def teacher_logp(self, parts, meta):
        import torch

        return torch.log_softmax(parts["logits"].float(), dim=-1)
