"""Responses written by an LM ensemble: each row is a prompt (:class:`darkstore.text.PromptSet`) that the
teachers answer token by token, drawing each token from their combined distribution; the targets stored at a
written position are that distribution, taken in the same pass (no second forward).

A chunk's rows are decoded in batches, left-padded, each member continuing from its key/value cache
(:meth:`darkstore.lm.LanguageModel.start` and ``step``). The draws are a pure function of (seed, prompt,
sample, step) (:func:`darkstore.philox.philox`), so a resumed or sharded job writes the same tokens. A response
ends at the tokenizer's EOS, at a stop string (the token completing it is its last) or at ``max_new_tokens`` /
the row's end; the store keeps why (``finish``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from darkstore.lm import LanguageModel
from darkstore.philox import philox, uniforms
from storage import StoreWriter
from storage.errors import NonFiniteLogitsError
from storage.schema import ResponsesRecord

from ..combine import combine
from ..prepared import Cancelled, in_store_order
from .token_targets import ChunkTargets

#: the second half of the draws' Philox key (the first is the job's seed)
DRAW_KEY = 0x5E5F0D5EC0DE
EOS, STOP, LENGTH = 1, 2, 3
#: how many of the most likely tokens a nucleus is looked for among, in turn, before a row is sorted whole
NUCLEUS_FIRST = (256, 4096)
#: decoding steps' values held before their targets are encoded together
PENDING_BYTES = 8 << 20


@dataclass
class Sampler:
    """Draws a token from the ensemble's combined values ``ℓ``: from softmax(ℓ / (T · τ)) (T the store's
    temperature, τ the decoding one; τ = 0: the largest), cut to its top-p nucleus, by inverse CDF at a
    uniform of (seed, prompt, sample, step)."""

    record: ResponsesRecord
    temperature: float

    def uniforms(self, prompts: np.ndarray, samples: np.ndarray, steps: int) -> torch.Tensor:
        """[b, steps] float64 uniforms of rows (prompt, sample)."""
        b = len(prompts)
        counters = np.zeros((b, steps, 4), dtype=np.uint64)
        counters[..., 0] = np.asarray(prompts, dtype=np.uint64)[:, None]
        counters[..., 1] = np.asarray(samples, dtype=np.uint64)[:, None]
        counters[..., 2] = np.arange(steps, dtype=np.uint64)[None]
        return torch.from_numpy(uniforms(philox(counters, (self.record.seed, DRAW_KEY))[..., 0]))

    def draw(self, ell: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """[b, V] values and [b] uniforms -> [b] token ids. With top-p, a row's nucleus is looked for among its
        most likely tokens (a top-k of each size in :data:`NUCLEUS_FIRST`, far cheaper than a sort), the whole
        row sorted only where they hold less than top-p."""
        tau, top_p = self.record.temperature, self.record.top_p
        if tau == 0:
            return ell.argmax(-1)
        x = ell.double()
        if self.temperature * tau != 1:
            x = x / (self.temperature * tau)
        logz = x.logsumexp(-1, keepdim=True)
        u = u.to(x.device, torch.float64)[:, None]
        if top_p >= 1:
            return _inverse_cdf((x - logz).exp(), None, u, 1.0)
        out = torch.empty(len(x), dtype=torch.long, device=x.device)
        rows = torch.arange(len(x), device=x.device)
        for k in (*(k for k in NUCLEUS_FIRST if k < x.shape[-1]), x.shape[-1]):
            vals, order = x[rows].topk(k, dim=-1) if k < x.shape[-1] else x[rows].sort(dim=-1, descending=True)
            p = (vals - logz[rows]).exp()
            found = p.sum(-1) >= top_p if k < x.shape[-1] else torch.ones(len(rows), dtype=torch.bool)
            out[rows[found]] = _inverse_cdf(p[found], order[found], u[rows[found]], top_p)
            rows = rows[~found]
            if not len(rows):
                break
        return out


def _inverse_cdf(p: torch.Tensor, order: torch.Tensor | None, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The token at uniform ``u`` of probabilities ``p`` [b, n] (in the order ``order`` gives: descending for a
    nucleus; None: the vocabulary's), keeping the prefix whose mass before each token is below ``top_p``."""
    cdf = p.cumsum(-1)
    last = p.shape[-1] - 1
    if top_p < 1:
        last = (((cdf - p) < top_p).sum(-1, keepdim=True) - 1).clamp_min(0)
    total = cdf[:, -1:] if top_p >= 1 else cdf.gather(-1, last)
    idx = torch.searchsorted(cdf, (u * total).contiguous(), right=True)
    idx = torch.minimum(idx, last if torch.is_tensor(last) else torch.full_like(idx, last))[:, 0]
    return idx if order is None else order.gather(1, idx[:, None])[:, 0]


class Stops:
    """Whether a response's last token completes one of the stop strings (as its tokenizer decodes them)."""

    def __init__(self, strings: Sequence[str], tokenizer: Any):
        self.strings, self.tokenizer = list(strings), tokenizer
        self.window = max((len(s) for s in self.strings), default=0) + 8  # tokens: each holds at least a byte

    def hit(self, ids: list[int]) -> bool:
        if not self.strings:
            return False
        tail = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=False)
        before = self.tokenizer.decode(ids[-self.window:-1], skip_special_tokens=False)
        return any(s in tail and s not in before for s in self.strings)


@dataclass
class Rows:
    """A batch of rows to answer: chunk-local ``rows``, their tokens [b, L + 1] (the prompt, then padding) and
    prompt lengths, and the (prompt, sample) their draws are keyed by."""

    rows: np.ndarray
    tokens: np.ndarray
    plen: np.ndarray
    prompts: np.ndarray
    samples: np.ndarray


@dataclass
class Decoding:
    """What one job's decoding needs besides the rows."""

    members: list[LanguageModel]
    sampler: Sampler
    stops: Stops
    eos: int | None
    pad: int
    rule: str
    device: torch.device
    records: np.ndarray  # per prompt, the transfer set's record it came from: what its draws are keyed by

    def left_padded(self, batch: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(batch.plen.max())
        x = np.full((len(batch.rows), width), self.pad, dtype=np.int64)
        for j, n in enumerate(batch.plen):
            x[j, width - n:] = batch.tokens[j, :n]
        valid = np.arange(width)[None] >= (width - batch.plen)[:, None]
        return torch.from_numpy(x).to(self.device), torch.from_numpy(valid).to(self.device)


@torch.inference_mode()
def answer(dec: Decoding, batch: Rows, out: ChunkTargets, mask: np.ndarray, finish: np.ndarray,
           refuse: Callable[[int, int], None]) -> int:
    """Write the responses of ``batch`` into its rows of ``batch.tokens``, ``mask`` and ``finish`` (chunk-local
    arrays) and their targets into ``out``; returns the tokens written."""
    length = out.length
    budget = np.minimum(dec.sampler.record.max_new_tokens, length + 1 - batch.plen)
    steps = int(budget.max())
    u = dec.sampler.uniforms(batch.prompts, batch.samples, steps)
    x, valid = dec.left_padded(batch)
    started = [m.start(x, valid, x.shape[1] + steps) for m in dec.members]
    hidden, states = [h for h, _ in started], [s for _, s in started]
    active = np.ones(len(batch.rows), dtype=bool)
    vocab = out.meta.num_classes
    pending = Pending(out, refuse, dec.members)
    for s in range(steps):
        z = torch.stack([m.logits(h)[..., :vocab] for m, h in zip(dec.members, hidden)])
        ell = combine(z, dec.rule, out.meta.temperature)
        token = dec.sampler.draw(ell, u[:, s])
        on = np.flatnonzero(active)
        pos = batch.plen[on] - 1 + s
        pending.add(batch.rows[on], pos, ell, z, token, on)
        host = token[on].cpu().numpy()
        batch.tokens[on, pos + 1] = host
        mask[batch.rows[on], pos] = 1
        _finish(dec, batch, on, host, s, budget, finish, active)
        if not active.any():
            break
        hidden = [m.step(token, st) for m, st in zip(dec.members, states)]
    return pending.flush()


class Pending:
    """Decoding steps' values held until about :data:`PENDING_BYTES` of them are, then encoded as one batch of
    positions (a step's few rows would pay each operation's fixed cost once per step)."""

    def __init__(self, out: ChunkTargets, refuse: Callable[[int, int], None], members: Sequence[LanguageModel]):
        self.out, self.refuse, self.members = out, refuse, members
        self.parts: list[tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.bytes = self.written = 0

    def add(self, rows: np.ndarray, pos: np.ndarray, ell: torch.Tensor, z: torch.Tensor, token: torch.Tensor,
            on: np.ndarray) -> None:
        sel = torch.from_numpy(on).to(ell.device)
        self.parts.append((rows, pos, ell.index_select(0, sel), z.index_select(1, sel), token.index_select(0, sel)))
        self.bytes += 4 * ell.shape[-1] * len(on) * (1 + z.shape[0])
        if self.bytes >= PENDING_BYTES:
            self.flush()

    def flush(self) -> int:
        """Encode what is held; the tokens written so far."""
        if self.parts:
            rows, pos = (np.concatenate([p[i] for p in self.parts]) for i in (0, 1))
            ell, token = torch.cat([p[2] for p in self.parts]), torch.cat([p[4] for p in self.parts])
            z = torch.cat([p[3] for p in self.parts], dim=1)
            self.out.add_at(rows, pos, ell, token, self.refuse)
            self.out.count_teachers(z[:, :, None], token[:, None], torch.ones_like(token, dtype=torch.bool)[:, None])
            self.written += len(rows)
            self.parts, self.bytes = [], 0
        return self.written


def _finish(dec: Decoding, batch: Rows, on: np.ndarray, tok: np.ndarray, s: int, budget: np.ndarray,
            finish: np.ndarray, active: np.ndarray) -> None:
    """Mark the rows ``on`` that their token ``tok`` at step ``s`` ends: EOS, a stop string, the budget."""
    for j, t in zip(on, tok):
        why = 0
        if dec.eos is not None and t == dec.eos:
            why = EOS
        elif dec.stops.hit(batch.tokens[j, batch.plen[j]:batch.plen[j] + s + 1].tolist()):
            why = STOP
        elif s + 1 >= budget[j]:
            why = LENGTH
        if why:
            finish[batch.rows[j]] = why
            active[j] = False


def decoding(job, meta) -> Decoding:
    """The job's decoding: its members, the store's settings, the tokenizer's EOS and padding."""
    tok = job.data.tokenizer
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    record = meta.sequence.responses
    return Decoding(job.members, Sampler(record, meta.temperature), Stops(record.stop, tok.tokenizer), tok.eos_id,
                    0 if pad is None else pad, meta.combine, job.device, np.asarray(job.data.kept, dtype=np.int64))


def compute_chunk(dec: Decoding, data, writer: StoreWriter, i: int, batch_size: int) -> dict[str, Any]:
    """Chunk ``i``'s responses and targets (rows in store order): its rows in batches of similar prompt length."""
    meta = writer.meta
    start, stop = writer.bounds(i)
    out = ChunkTargets(meta, stop - start, i)
    out.fill_blank(meta.num_classes, dec.device)
    tokens, plen = (a.numpy().copy() for a in data.get_batch(np.arange(start, stop)))
    index = data.sample_of(np.arange(start, stop))
    n = meta.sequence.responses.n
    prompts = dec.records[index // n]
    mask = np.zeros((stop - start, meta.sequence.length), dtype=np.uint8)
    finish = np.zeros(stop - start, dtype=np.uint8)
    order = np.argsort(plen, kind="stable")

    def refuse(row: int, pos: int) -> None:
        raise NonFiniteLogitsError(f"the teachers produced NaN/Inf logits writing position {pos} of response "
                                   f"{int(index[row])}; nothing of its chunk was written")

    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        batch = Rows(rows, tokens[rows], plen[rows], prompts[rows], index[rows] % n)
        answer(dec, batch, out, mask, finish, refuse)
        tokens[rows] = batch.tokens
    return {"tokens": tokens, "loss_mask": mask, "finish": finish, "index": index, "stats": out.stats,
            "nll": out.nll, "teacher_positions": out.teacher_positions, **out.parts}


def run_response_chunks(job, writer: StoreWriter, chunks: Sequence[int], *, batch_size: int = 8,
                        on_rows: Callable[[int], None] | None = None,
                        on_chunk: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> int:
    """Write and commit ``chunks`` of a responses store (see :func:`teacher_service.generate.run_chunks`)."""
    meta = writer.meta
    data = in_store_order(job.data, meta)
    dec = decoding(job, meta)
    written = 0
    for i in chunks:
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped before chunk {i}; {written} rows were committed in this run")
        fields = compute_chunk(dec, data, writer, i, batch_size)
        writer.write_chunk(i, **fields)
        rows = len(fields["finish"])
        written += rows
        if on_rows:
            on_rows(rows)
        if on_chunk:
            on_chunk(i, rows)
    return written
