"""The same loop with Hugging Face Accelerate: device placement and mixed precision are Accelerate's; the
batches, targets and loss are darkstore's.

    python examples/accelerate_loop.py --store STORE [--epochs 5]

darkstore's loader shards the store itself (``rank``/``world_size`` from the accelerator: each process reads
its own chunks), so it is not passed through ``accelerator.prepare``; batches move with
``batch.to(accelerator.device)``, which also makes a views store's views on that device. Under several
processes each rank's shard may hold a different number of batches: cap each epoch at the smallest (as
``darkstore train`` does under torchrun). Prints one JSON line from the main process.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator
from torch import nn

from darkstore import SoftTargets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    acc = Accelerator()
    torch.manual_seed(0)
    targets = SoftTargets(args.store, temperature=args.temperature)
    train_rows, eval_rows = targets.split(holdout=0.2)
    x0, _ = targets.data[0]
    model = nn.Sequential(nn.Flatten(), nn.Linear(x0.numel(), 64), nn.ReLU(), nn.Linear(64, targets.num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, opt = acc.prepare(model, opt)
    loader = targets.loader(train_rows, batch_size=64, seed=0, rank=acc.process_index,
                            world_size=acc.num_processes, device=acc.device)

    def agreement() -> float:
        model.eval()
        hits = total = 0
        with torch.no_grad():
            for batch in targets.loader(eval_rows, batch_size=512, shuffle=False).epoch(0):
                batch = batch.to(acc.device)
                hits += int((model(batch.x).argmax(-1) == targets.teacher_argmax(batch)).sum())
                total += len(batch)
        model.train()
        return hits / max(1, total)

    before = agreement()
    for epoch in range(1, args.epochs + 1):
        for batch in loader.epoch(epoch):
            batch = batch.to(acc.device)
            loss = targets.loss(model(batch.x), batch, alpha=args.alpha)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
    if acc.is_main_process:
        print(json.dumps({"processes": acc.num_processes, "device": str(acc.device), "agreement_before": before,
                          "agreement_after": agreement()}))


if __name__ == "__main__":
    main()
