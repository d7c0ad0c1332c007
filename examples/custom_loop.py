"""Distil a student in your own PyTorch loop from a darkstore store.

    python examples/custom_loop.py --store STORE [--epochs 5 --temperature 4 --alpha 0.9]

Uses only the library API (``darkstore.SoftTargets``): the store's targets re-temperatured to T, streamed with
their inputs and hard labels, and Hinton's loss — the same loader and objective ``darkstore train`` uses. The
student is any ``nn.Module`` (here a small MLP on the flattened input). Prints one JSON line: the held-out
agreement with the teachers before and after training.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from darkstore import SoftTargets


@torch.no_grad()
def agreement(model: nn.Module, targets: SoftTargets, rows) -> float:
    """How often the student's top class is the teachers' on ``rows``."""
    model.eval()
    hits = total = 0
    for batch in targets.loader(rows, batch_size=512, shuffle=False).epoch(0):
        hits += int((model(batch.x).argmax(-1) == targets.teacher_argmax(batch)).sum())
        total += len(batch)
    model.train()
    return hits / max(1, total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    torch.manual_seed(0)
    targets = SoftTargets(args.store, temperature=args.temperature)
    train_rows, eval_rows = targets.split(holdout=0.2)
    x0, _ = targets.data[0]
    model = nn.Sequential(nn.Flatten(), nn.Linear(x0.numel(), 64), nn.ReLU(), nn.Linear(64, targets.num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    before = agreement(model, targets, eval_rows)

    loader = targets.loader(train_rows, batch_size=64, seed=0)
    for epoch in range(1, args.epochs + 1):
        for batch in loader.epoch(epoch):
            loss = targets.loss(model(batch.x), batch, alpha=args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    print(json.dumps({"targets": targets.describe(), "agreement_before": before,
                      "agreement_after": agreement(model, targets, eval_rows)}))


if __name__ == "__main__":
    main()
