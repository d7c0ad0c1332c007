"""A small GPT (decoder-only transformer) built into darkstore, for language-model teachers and students that
need no other library: ``arch: gpt`` with ``num_classes`` the vocabulary size.

Pre-norm blocks of causal self-attention (``scaled_dot_product_attention``) and a GELU MLP, learned position
embeddings, an untied output head. :meth:`GPT.hidden` and :meth:`GPT.head` split the forward pass so that a
caller can apply the head to a slice of positions at a time (the [batch, length, vocabulary] logits of a
long sequence need not exist at once)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (a.view(b, t, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``num_classes``: the vocabulary size; ``block_size``: the longest sequence it takes."""

    def __init__(self, num_classes: int, block_size: int = 256, n_layer: int = 2, n_head: int = 2,
                 n_embd: int = 64, dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
        self.block_size = block_size
        self.wte = nn.Embedding(num_classes, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(_Block(n_embd, n_head, dropout) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, num_classes, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def max_positions(self) -> int:
        return self.block_size

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, n_embd], after the final norm."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"a sequence of {t} tokens is longer than this GPT's block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        return self.ln_f(self.blocks(self.drop(self.wte(idx) + self.wpe(pos))))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, vocabulary] logits."""
        return self.head(self.hidden(idx))
