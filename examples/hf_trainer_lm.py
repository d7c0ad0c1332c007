"""Per-token soft targets in a Hugging Face ``Trainer``: a small ``transformers`` GPT-2 distilled from a darkstore
language-model store. The Trainer runs the loop (optimiser, schedule, logging, devices); darkstore gives the
batches and the loss.

    python examples/hf_trainer_lm.py --store STORE [--max-steps 200]

The Trainer's dataloader is darkstore's own (a resumable epoch of the store's chunks, sharded by rank), its
batches handed over as dicts (``SoftTargets.fields``: ``input_ids``, ``labels`` and the stored targets), and
``compute_loss`` is ``SoftTargets.loss`` on the model's logits: what ``darkstore train`` minimises. Prints one
JSON line: the student's held-out perplexity, its KL to the teachers and its agreement with them, before and
after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from darkstore import SoftTargets


class StoreBatches:
    """darkstore's batches as the dicts a Trainer passes to ``compute_loss``, epoch after epoch (the Trainer
    stops at ``max_steps``)."""

    def __init__(self, targets: SoftTargets, rows, batch_size: int, rank: int, world_size: int):
        self.targets = targets
        self.loader = targets.loader(rows, batch_size=batch_size, seed=0, rank=rank, world_size=world_size)

    def __iter__(self):
        for epoch in itertools.count(1):
            for batch in self.loader.epoch(epoch):
                yield self.targets.fields(batch)


class DistillTrainer(Trainer):
    def __init__(self, *args, targets: SoftTargets, rows, alpha: float, batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets, self.rows, self.alpha, self.batch = targets, rows, alpha, batch_size

    def get_train_dataloader(self):
        return StoreBatches(self.targets, self.rows, self.batch, self.args.process_index, self.args.world_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"])
        logits = out.logits[..., :self.targets.meta.sequence.tokenizer.vocab_size]
        loss = self.targets.loss(logits, inputs, alpha=self.alpha)
        return (loss, out) if return_outputs else loss


@torch.no_grad()
def held_out(model, targets: SoftTargets, rows) -> dict[str, float]:
    """Over the held-out positions with a loss: perplexity, the soft term alone (T²·KL to the teachers, the
    loss at α = 1) and agreement with the teachers' top token."""
    model.eval()
    nll = kl = hits = n = 0.0
    vocab = targets.meta.sequence.tokenizer.vocab_size
    for batch in targets.loader(rows, batch_size=32, shuffle=False).epoch(0):
        batch = batch.to(model.device)
        logits = model(input_ids=batch.x).logits[..., :vocab].float()
        logp = torch.log_softmax(logits, -1)
        keep = batch.labels >= 0
        nll -= float(logp.gather(-1, batch.labels.clamp(min=0)[..., None]).squeeze(-1)[keep].sum())
        kl += float(targets.loss(logits, batch, alpha=1.0)) * float(keep.sum())
        hits += float((logp.argmax(-1) == targets.teacher_argmax(batch))[keep].sum())
        n += float(keep.sum())
    model.train()
    return {"perplexity": math.exp(nll / n), "kl": kl / n, "agreement": hits / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    targets = SoftTargets(args.store)  # T = 1 for a language model's store
    train_rows, eval_rows = targets.split(holdout=0.1)
    seq = targets.meta.sequence
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=seq.tokenizer.vocab_size, n_positions=seq.length, n_embd=64,
                                       n_layer=2, n_head=2, bos_token_id=seq.tokenizer.eos_id,
                                       eos_token_id=seq.tokenizer.eos_id))
    before = held_out(model, targets, eval_rows)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DistillTrainer(
            model=model, targets=targets, rows=train_rows, alpha=args.alpha, batch_size=16,
            args=TrainingArguments(output_dir=tmp, max_steps=args.max_steps, learning_rate=args.lr,
                                   lr_scheduler_type="cosine", save_strategy="no", report_to=[], logging_steps=50,
                                   use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                                   remove_unused_columns=False))
        trainer.train()
    after = held_out(model, targets, eval_rows)
    if trainer.is_world_process_zero():
        print(json.dumps({**{f"{k}_before": v for k, v in before.items()},
                          **{f"{k}_after": v for k, v in after.items()}}))


if __name__ == "__main__":
    main()
