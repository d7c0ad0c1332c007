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

    def cached(self, x: torch.Tensor, cache: "KVCache", layer: int, attend: torch.Tensor) -> torch.Tensor:
        """The block on new positions ``x`` [B, T, C], their keys and values written into ``cache`` after those
        already there; ``attend`` [B, 1, T, S]: which of the S cached positions each new one sees."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (a.view(b, t, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))
        k, v = cache.put(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (a.view(b, t, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class KVCache:
    """Keys and values of every layer for positions written so far, in buffers of ``size`` positions."""

    def __init__(self, layers: int, batch: int, heads: int, size: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, size, head_dim)
        self.k = [like.new_empty(shape) for _ in range(layers)]
        self.v = [like.new_empty(shape) for _ in range(layers)]
        self.used = 0

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` [B, H, T, D] after the positions used; the keys and values up to them."""
        stop = self.used + k.shape[2]
        self.k[layer][:, :, self.used:stop] = k
        self.v[layer][:, :, self.used:stop] = v
        if layer == len(self.k) - 1:
            self.used = stop
        return self.k[layer][:, :, :stop], self.v[layer][:, :, :stop]


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

    def new_cache(self, batch: int, size: int, like: torch.Tensor) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``size`` positions."""
        blocks = list(self.blocks)
        width = self.wte.embedding_dim
        heads = blocks[0].heads if blocks else 1
        return KVCache(len(blocks), batch, heads, size, width // heads, like)

    def hidden_cached(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, attend: torch.Tensor
                      ) -> torch.Tensor:
        """[B, T] new token ids at positions ``pos`` [B, T], after those in ``cache`` -> [B, T, n_embd]; ``attend``
        [B, 1, T, S] says which of the S = used + T cached positions each new one sees (a left-padded batch:
        its padding is seen by none but itself)."""
        if int(pos.max()) >= self.block_size:
            raise ValueError(f"position {int(pos.max())} is beyond this GPT's block_size {self.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block.cached(x, cache, i, attend)
        return self.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, vocabulary] logits."""
        return self.head(self.hidden(idx))


def to_gpt2(model: GPT, *, eos_id: int | None = None):
    """The same network as a ``transformers`` ``GPT2LMHeadModel`` (exact GELU, no dropout, an untied head), so
    that a built-in GPT student loads with ``AutoModelForCausalLM``: GPT-2's blocks are these blocks, its
    ``Conv1D`` weights the transposes of these ``Linear`` ones."""
    from transformers import GPT2Config, GPT2LMHeadModel

    width, blocks = model.wte.embedding_dim, list(model.blocks)
    cfg = GPT2Config(vocab_size=model.wte.num_embeddings, n_positions=model.block_size, n_embd=width,
                     n_layer=len(blocks), n_head=blocks[0].heads if blocks else 1, activation_function="gelu",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=model.ln_f.eps,
                     tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id)
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias,
             "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(blocks):
        pairs = {"ln_1": b.ln1, "ln_2": b.ln2, "attn.c_attn": b.qkv, "attn.c_proj": b.proj, "mlp.c_fc": b.mlp[0],
                 "mlp.c_proj": b.mlp[2]}
        for name, m in pairs.items():
            conv = isinstance(m, nn.Linear)
            state[f"transformer.h.{i}.{name}.weight"] = m.weight.t() if conv else m.weight
            state[f"transformer.h.{i}.{name}.bias"] = m.bias
    out = GPT2LMHeadModel(cfg)
    missing, unexpected = out.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()},
                                              strict=False)
    if unexpected or any(not k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing):
        raise RuntimeError(f"GPT-2 layout mismatch: missing {missing}, unexpected {unexpected}")
    return out.eval()
