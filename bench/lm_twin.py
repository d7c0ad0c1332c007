"""The LM student recipe in plain PyTorch: no darkstore code (torch, numpy and safetensors only).

    python bench/lm_twin.py --rows rows.npz --heldout heldout.npz --out result.json [--targets topk.npz |
        --teachers teachers.json] --layers 2 --width 96 --epochs 2 --batch-size 16 --lr 3e-3 --alpha 0.5 --seed 0

The reference ``bench/lm_students.py`` puts beside ``darkstore train`` and ``darkstore sweep``:

- offline (``--targets``): a top-k store's fields exported to a ``.npz`` (kept tokens, their values as floats,
  the tail's log-sum-exp, [N, L, ...]) are the targets: the same recipe as darkstore's from its own code, so
  that the two agree within the spread over seeds, or something in darkstore is wrong;
- online (``--teachers``): the teachers (built-in GPTs, safetensors) run at every step and their geometric
  mean's top-k and tail are the targets: what a user without a store runs, one process per student.

The recipe: a GPT (pre-norm blocks, learned positions, untied head), AdamW with a linear warm-up and a cosine
schedule, batches drawn
by a seeded permutation each epoch, ``α · KL(buckets) + (1 − α) · CE`` over the positions with a loss (the
K kept tokens one by one and the rest as one bucket, T = 1). Writes JSON: held-out perplexity over ``heldout``'s
positions with a loss, the training loop's seconds and the whole process's.
"""

from __future__ import annotations

import argparse
import json
import math
import time

T_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (a.view(b, t, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*(Block(n_embd, n_head) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self.ln_f(self.blocks(self.wte(idx) + self.wpe(pos))))


def bucket_kl(logits, index, head, tail):
    """[n] KL over the K kept tokens and one bucket for the rest, teacher (head values, tail lse) to student."""
    logq = F.log_softmax(logits.float(), -1)
    q_head = logq.gather(-1, index)
    q_rest = torch.log1p(-torch.exp(torch.logsumexp(q_head, -1)).clamp(max=1 - 1e-7))
    logp = F.log_softmax(torch.cat([head, tail[:, None]], -1), -1)
    logq_b = torch.cat([q_head, q_rest[:, None]], -1)
    return (logp.exp() * (logp - logq_b)).sum(-1)


class Teachers:
    """Online targets: the teachers' geometric mean at every step, its top K and the log-sum-exp of the rest."""

    def __init__(self, spec: str, vocab: int, k: int):
        self.members, self.vocab, self.k = [], vocab, k
        for m in json.loads(open(spec).read()):
            net = GPT(vocab, **m["arch_kwargs"])
            net.load_state_dict(load_file(m["weights"]))
            self.members.append(net.eval())

    @torch.no_grad()
    def __call__(self, x, keep):
        z = torch.stack([m(x)[..., :self.vocab] for m in self.members]).mean(0)[keep]
        head, idx = z.topk(self.k, -1)
        tail = torch.logsumexp(z.scatter(-1, idx, float("-inf")), -1)
        hi = head[:, :1]
        return idx, head - hi, tail - hi[:, 0]


def heldout_perplexity(model, tokens, mask) -> float:
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens), 32):
            x, y, m = tokens[s:s + 32, :-1], tokens[s:s + 32, 1:], mask[s:s + 32]
            logp = F.log_softmax(model(x).float(), -1)
            nll -= float(logp.gather(-1, y[..., None]).squeeze(-1)[m].sum())
            n += int(m.sum())
    model.train()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", required=True, help=".npz: tokens [N, L + 1], loss_mask [N, L]")
    ap.add_argument("--heldout", required=True, help=".npz: tokens, loss_mask of the held-out rows")
    ap.add_argument("--targets", help=".npz: topk_index, head, tail_lse [N, L, ...] (offline)")
    ap.add_argument("--teachers", help="JSON list of {arch_kwargs, weights} (online)")
    ap.add_argument("--k", type=int, default=32, help="online: kept tokens")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.0, help="fraction of the steps warming the LR up linearly")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d = np.load(a.rows)
    tokens, mask = torch.from_numpy(d["tokens"].astype(np.int64)), torch.from_numpy(d["loss_mask"].astype(bool))
    h = np.load(a.heldout)
    h_tokens, h_mask = torch.from_numpy(h["tokens"].astype(np.int64)), torch.from_numpy(h["loss_mask"].astype(bool))
    stored = {k: torch.from_numpy(v) for k, v in np.load(a.targets).items()} if a.targets else None
    online = Teachers(a.teachers, a.vocab, a.k) if a.teachers else None
    torch.manual_seed(a.seed)
    model = GPT(a.vocab, tokens.shape[1] - 1, a.layers, a.heads, a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)  # darkstore's default decay
    steps = a.epochs * math.ceil(len(tokens) / a.batch_size)
    warm = int(a.warmup * steps)

    def factor(s: int) -> float:  # linear warm-up, then a cosine to zero (darkstore's schedule)
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    for _ in range(a.epochs):
        perm = torch.from_numpy(rng.permutation(len(tokens)))
        for s in range(0, len(tokens), a.batch_size):
            r = perm[s:s + a.batch_size]
            x, y, keep = tokens[r, :-1], tokens[r, 1:], mask[r]
            if online is not None:
                idx, head, tail = online(x, keep)
            else:
                idx, head, tail = (stored[k][r][keep] for k in ("topk_index", "head", "tail_lse"))
            logits = model(x)[keep]
            per = a.alpha * bucket_kl(logits, idx.long(), head.float(), tail.float())
            loss = (per + (1 - a.alpha) * F.cross_entropy(logits.float(), y[keep], reduction="none")).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - t0
    out = {"perplexity": heldout_perplexity(model, h_tokens, h_mask), "train_seconds": train_s,
           "process_seconds": time.perf_counter() - T_START, "steps": steps}
    open(a.out, "w").write(json.dumps(out))


if __name__ == "__main__":
    main()
