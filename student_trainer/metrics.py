"""Evaluation metrics as pure functions of logits [N, C] and labels [N] (−1 unlabeled)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ECE_BINS = 15


def reliability(student: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list[float] | float]:
    """Reliability diagram data and expected calibration error (equal-width confidence bins).

    ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b| over labeled rows (Guo et al., 2017)."""
    lab = labels >= 0
    p = torch.softmax(student[lab].double(), -1)
    conf, pred = p.max(-1)
    correct = (pred == labels[lab]).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1])  # bins (lo, hi]; the first also takes 0
    count = torch.bincount(idx, minlength=bins).double()
    sum_conf = torch.bincount(idx, weights=conf, minlength=bins)
    sum_acc = torch.bincount(idx, weights=correct, minlength=bins)
    n = max(1.0, float(count.sum()))
    ece = float((sum_acc - sum_conf).abs().sum() / n)
    safe = count.clamp(min=1)
    return {"edges": edges.tolist(), "count": [int(c) for c in count], "confidence": (sum_conf / safe).tolist(),
            "accuracy": (sum_acc / safe).tolist(), "ece": ece}


def confusion(student: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts [true class][predicted class] over labeled rows."""
    lab = labels >= 0
    k = labels[lab] * num_classes + student[lab].argmax(-1)
    return torch.bincount(k, minlength=num_classes * num_classes).view(num_classes, num_classes).tolist()


def evaluate_logits(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL and ECE on labeled rows, top-1 agreement with the teacher on all rows."""
    out: dict[str, float] = {"rows": int(len(student))}
    pred = student.argmax(-1)
    out["agreement"] = float((pred == teacher.argmax(-1)).float().mean())
    lab = labels >= 0
    if bool(lab.any()):
        s, y = student[lab].double(), labels[lab]
        out["accuracy"] = float((pred[lab] == y).double().mean())
        out["nll"] = float(F.cross_entropy(s, y))
        out["ece"] = float(reliability(student, labels)["ece"])
        out["teacher_accuracy"] = float((teacher[lab].argmax(-1) == y).double().mean())
        out["labeled_rows"] = int(lab.sum())
    return out
