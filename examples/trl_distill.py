"""Distil a student with TRL from darkstore's targets: TRL's ``SFTTrainer`` runs the loop, the data is a
sequence store exported as a Hugging Face dataset (``darkstore targets export STORE -f hf --out DIR``), and the
loss reads each position's top-K teacher log-probabilities and the tail's mass from its columns.

    python examples/trl_distill.py --data DIR [--max-steps 200] [--alpha 0.5]

The loss at a position with a label is α · KL(teachers ‖ student) over the K kept tokens plus one bucket for
the mass left out (the teachers' ``tail_logprob`` against the student's mass outside the same K), plus
(1 − α) · the cross-entropy of the label; averaged over those positions. Prints one JSON line: the student's
KL to the teachers and its perplexity on held-out rows, before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
from trl import SFTConfig, SFTTrainer

COLUMNS = ("input_ids", "attention_mask", "labels", "topk_ids", "topk_logprobs", "tail_logprob")


class TopKCollator:
    """Rows of the export padded to the batch's longest: ``input_ids`` with the padding token, ``labels`` with
    -100 (no loss there), and the targets' positions with zeros (never read: their labels are -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        k = len(rows[0]["topk_ids"][0])

        def pad(name, fill, dtype, shape=()):
            out = torch.full((len(rows), width, *shape), fill, dtype=dtype)
            for i, r in enumerate(rows):
                v = torch.as_tensor(r[name], dtype=dtype)
                out[i, :len(v)] = v
            return out

        return {"input_ids": pad("input_ids", self.pad_id, torch.long),
                "attention_mask": pad("attention_mask", 0, torch.long), "labels": pad("labels", -100, torch.long),
                "topk_ids": pad("topk_ids", 0, torch.long, (k,)),
                "topk_logprobs": pad("topk_logprobs", 0.0, torch.float32, (k,)),
                "tail_logprob": pad("tail_logprob", 0.0, torch.float32)}


def topk_kl(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position with a label (the target of position t is the token after it): the KL from the teachers'
    top K and tail to the student, and the student's cross-entropy of the label."""
    keep = batch["labels"][:, 1:] != -100
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)[keep]
    ids = batch["topk_ids"][:, :-1][keep]
    p_head, p_tail = batch["topk_logprobs"][:, :-1][keep], batch["tail_logprob"][:, :-1][keep]
    q_head = logq.gather(-1, ids)
    q_tail = torch.log1p(-q_head.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (p_head.exp() * (p_head - q_head)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
    ce = -logq.gather(-1, batch["labels"][:, 1:][keep][:, None]).squeeze(-1)
    return kl, ce


class TopKDistillTrainer(SFTTrainer):
    def __init__(self, *args, alpha: float, vocab: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.vocab = alpha, vocab

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        kl, ce = topk_kl(out.logits[..., :self.vocab], inputs)
        loss = (self.alpha * kl + (1 - self.alpha) * ce).mean()
        return (loss, out) if return_outputs else loss


@torch.no_grad()
def held_out(model, rows, collate, vocab: int) -> dict[str, float]:
    model.eval()
    kl_sum = nll = n = 0.0
    for i in range(0, len(rows), 32):
        batch = collate([rows[j] for j in range(i, min(i + 32, len(rows)))])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        kl, ce = topk_kl(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab],
                         batch)
        kl_sum, nll, n = kl_sum + float(kl.sum()), nll + float(ce.sum()), n + len(kl)
    model.train()
    return {"kl": kl_sum / n, "perplexity": math.exp(nll / n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a `darkstore targets export -f hf` folder")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    manifest = json.loads((args.data / "darkstore-export.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.data / "tokenizer")
    rows = datasets.load_dataset(str(args.data), split="train").select_columns(list(COLUMNS))
    split = rows.train_test_split(test_size=0.1, seed=0)
    vocab = manifest["tokenizer"]["vocab_size"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=manifest["store"]["length"] + 1, n_embd=64,
                                       n_layer=2, n_head=2, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    collate = TopKCollator(tokenizer.pad_token_id)
    before = held_out(model, split["test"], collate, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TopKDistillTrainer(
            model=model, alpha=args.alpha, vocab=vocab, train_dataset=split["train"], processing_class=tokenizer,
            data_collator=collate,
            args=SFTConfig(output_dir=tmp, max_steps=args.max_steps, learning_rate=args.lr, per_device_train_batch_size=16,
                           lr_scheduler_type="cosine", save_strategy="no", report_to=[], logging_steps=50,
                           use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False,
                           dataset_kwargs={"skip_prepare_dataset": True}))
        trainer.train()
    after = held_out(model, split["test"], collate, vocab)
    if trainer.is_world_process_zero():
        print(json.dumps({**{f"{k}_before": v for k, v in before.items()},
                          **{f"{k}_after": v for k, v in after.items()}}))


if __name__ == "__main__":
    main()
