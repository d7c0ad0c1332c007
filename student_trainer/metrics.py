"""Evaluation metrics as pure functions of logits [N, C] and labels [N] (−1 unlabeled)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def evaluate_logits(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and NLL on labeled rows, top-1 agreement with the teacher on all rows."""
    out: dict[str, float] = {"rows": int(len(student))}
    pred = student.argmax(-1)
    out["agreement"] = float((pred == teacher.argmax(-1)).float().mean())
    lab = labels >= 0
    if bool(lab.any()):
        s, y = student[lab].double(), labels[lab]
        out["accuracy"] = float((pred[lab] == y).double().mean())
        out["nll"] = float(F.cross_entropy(s, y))
        out["teacher_accuracy"] = float((teacher[lab].argmax(-1) == y).double().mean())
        out["labeled_rows"] = int(lab.sum())
    return out
