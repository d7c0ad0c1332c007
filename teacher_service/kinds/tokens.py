"""Generation for language models: per-position targets of an LM ensemble over token rows.

A row is a token sequence (:mod:`darkstore.text`); each member's backbone runs once per batch, then the
output heads, the combination and the target form's encoding run on a slice of positions at a time, sized so
that [members, batch, slice, vocabulary] float32 stays within ``slice_bytes``: memory is bounded whatever the
vocabulary and the length. Per chunk the store also gets the tokens, the loss mask, top-1 counts (stats) and
the summed negative log-likelihoods of the labels (nll) for the ensemble and each member.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from darkstore.errors import SpecError
from darkstore.lm import LanguageModel, check_fit, load_lm
from storage import StoreWriter
from storage.errors import NonFiniteLogitsError
from storage.schema import ChatRecord, ResponsesRecord, SequenceRecord, TokenizerRecord

from storage.kinds import Tokens

from ..combine import combine
from .responses import run_response_chunks
from .token_targets import ChunkTargets
from ..engines.run import connect_engines, run_engine_chunks, uses_engines
from ..prepared import Cancelled, PreparedJob, check_param_budget, in_store_order, store_meta, targets_record
from .base import TeacherKind

#: default bound on one slice's [members, batch, positions, vocabulary] float32 logits
SLICE_BYTES = 16 << 20
#: the largest vocabulary a dense sequence store takes (above it, every position would cost megabytes)
DENSE_VOCAB = 4096
#: where the members' heads fuse, each teacher's own statistics come from one position in TEACHER_STRIDE
TEACHER_STRIDE = 32
#: sampled positions gathered before the members' logits are made for them (fewer, larger products)
TEACHER_FLUSH = 4096


def load_members(spec, data, *, device: torch.device, allow_code: bool, roots, max_params: int | None
                 ) -> list[LanguageModel]:
    """Every LM member loaded, fitted to the transfer set's tokenizer and length, on ``device`` in eval mode."""
    vocab = data.tokenizer.vocab_size
    if max_params is not None:
        check_param_budget(spec.teachers.members, vocab, max_params)
    members = [load_lm(m, vocab_size=vocab, allow_code=allow_code, roots=roots, tokenizer=data.tokenizer)
               for m in spec.teachers.members]
    check_fit(members, data.tokenizer, data.length)
    probe = data.get_batch(np.arange(min(2, len(data))))[0][:, :-1].to(device)
    for m in members:
        m.module.to(device).eval()
        m.check_split(probe)
    return members


def sequence_record(data, stride: int = 1, responses: ResponsesRecord | None = None) -> SequenceRecord:
    """The sequence store's record of ``data``; with ``responses``, a prompt set's decoding settings and counts."""
    tok = data.tokenizer
    if responses is not None:
        responses = responses.model_copy(update={"prompts": data.prompts, "dropped": data.dropped})
    return SequenceRecord(length=data.length, packing=data.spec.packing, positions=data.positions,
                          text_bytes=data.rows.text_bytes, teacher_stride=stride, chat=chat_record(data),
                          responses=responses,
                          tokenizer=TokenizerRecord(path=tok.path, fingerprint=tok.fingerprint,
                                                    vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id))


def chat_record(data) -> ChatRecord | None:
    """A chat set's template and what did not fit, as the store keeps them."""
    if data.template is None:
        return None
    t, rows, spec = data.template, data.chat, data.spec.chat
    return ChatRecord(template=t.text, source=t.source, sha256=t.digest, turns=spec.turns, overflow=spec.overflow,
                      conversations=rows.conversations, truncated=rows.truncated, dropped=rows.dropped)


def check_dense(spec, vocab: int) -> None:
    """Dense targets of a large vocabulary are refused: every position would cost megabytes."""
    if spec.targets.spec.every_class and vocab > DENSE_VOCAB:
        raise SpecError(f"dense targets keep all {vocab:,} tokens at every position; above {DENSE_VOCAB:,} ask for "
                        "topk:K or sampled:K")


def prepare_sequences(spec, data, *, device: torch.device, allow_code: bool, roots, max_params: int | None):
    """The LM teachers loaded and checked against the text transfer set (for a responses job, its prompts:
    :class:`darkstore.text.PromptSet`); the sequence store's metadata."""
    vocab = data.tokenizer.vocab_size
    check_dense(spec, vocab)
    targets = targets_record(spec, vocab, "tokens")
    members = load_members(spec, data, device=device, allow_code=allow_code, roots=roots, max_params=max_params)
    stride = 1 if spec.responses is not None else teacher_stride(members, spec.combine)
    sequence = sequence_record(data, stride, spec.responses)
    meta = store_meta(spec, [m.loaded for m in members], data, vocab, None, sequence=sequence, targets=targets)
    return PreparedJob(spec, members, data, meta, device)


@dataclass
class Slices:
    """How many positions one slice of a batch takes: ``width`` float32 values of ``vocab`` tokens per position
    (the members' logits, or the one combined row) within the byte bound, the length split evenly."""

    width: int
    vocab: int
    budget: int = SLICE_BYTES

    def size(self, batch: int, length: int) -> int:
        most = max(1, min(length, self.budget // (4 * self.width * batch * self.vocab)))
        return -(-length // -(-length // most))  # as many slices as needed, of equal size


class FusedHead:
    """The geometric mean of members whose heads are plain float32 projections, as one accumulated product:
    ``ℓ = Σ_j h_j W_jᵀ / M`` (plus the mean bias). The members' logits never exist: no [M, …, V] buffer, no mean
    over members, no per-member pass; each member's own statistics come from a sample of positions instead
    (:class:`TeacherSample`)."""

    def __init__(self, heads: list[tuple[torch.Tensor, torch.Tensor | None]], vocab: int):
        self.weights = [w[:vocab].t() for w, _ in heads]
        self.scale = 1.0 / len(heads)
        biases = [b[:vocab] for _, b in heads if b is not None]
        self.bias = torch.stack(biases).sum(0) * self.scale if biases else None
        self._out: torch.Tensor | None = None  # reused: a fresh 16 MB buffer per slice costs page faults

    @staticmethod
    def fits(members: Sequence[LanguageModel], combine: str) -> bool:
        """Whether the members' combination can be one product: the geometric mean of plain heads."""
        return combine == "geometric" and all(m.plain_head() is not None for m in members)

    @classmethod
    def of(cls, members: Sequence[LanguageModel], combine: str, vocab: int) -> "FusedHead | None":
        if not cls.fits(members, combine):
            return None
        return cls([m.plain_head() for m in members], vocab)  # type: ignore[misc]

    def __call__(self, hidden: Sequence[torch.Tensor], pos: slice) -> torch.Tensor:
        """[b, s, V] the combined values of positions ``pos`` from each member's hidden states [b, L, H], in a
        buffer that the next call overwrites."""
        out = None
        for w, h in zip(self.weights, hidden):
            x = h[:, pos]
            x2 = x.reshape(-1, x.shape[-1])
            if out is None:
                out = self._buffer(x2.shape[0], w.shape[1], x.device)
                out.addmm_(x2, w, beta=0, alpha=self.scale)  # beta 0: what the buffer held is never read
            else:
                out.addmm_(x2, w, alpha=self.scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:2], -1)

    def _buffer(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        if self._out is None or self._out.numel() < rows * vocab or self._out.device != device:
            self._out = torch.empty(rows * vocab, device=device, dtype=torch.float32)
        return self._out[:rows * vocab].view(rows, vocab)


def teacher_stride(members: Sequence[LanguageModel], combine: str) -> int:
    """Every how many positions each teacher's own statistics are computed: all of them where its logits
    exist anyway, one in :data:`TEACHER_STRIDE` where the fused head does without them (:class:`TeacherSample`)."""
    return TEACHER_STRIDE if FusedHead.fits(members, combine) else 1


def member_logits(members: Sequence[LanguageModel], hidden: Sequence[torch.Tensor], pos: slice,
                  vocab: int) -> torch.Tensor:
    """[M, b, s, V] each member's logits at positions ``pos``, cut to the tokenizer's vocabulary."""
    b, s = hidden[0].shape[0], len(range(*pos.indices(hidden[0].shape[1])))
    z = torch.empty(len(members), b, s, vocab, device=hidden[0].device)
    for j, (m, h) in enumerate(zip(members, hidden)):
        m.logits_into(h[:, pos], z[j])
    return z


@dataclass
class Batch:
    """One batch of a chunk: its rows of the chunk, the members' hidden states, the labels and mask."""

    rows: slice
    hidden: list[torch.Tensor]
    y: torch.Tensor
    mask: torch.Tensor

    def refuse(self, members: Sequence[LanguageModel], sample: Callable[[int], int], vocab: int
               ) -> Callable[[int, int], None]:
        """A callback raising NonFiniteLogitsError for a row and position of this batch, naming the first
        member whose logits there are NaN, +Inf or all −Inf."""
        def raise_at(r: int, p: int) -> None:
            z = member_logits(members, [h[r:r + 1] for h in self.hidden], slice(p, p + 1), vocab)
            bad = [m.name for m, zm in zip(members, z) if not bool(torch.isfinite(zm.amax()))]
            who = f"teacher {bad[0]!r}" if bad else "the teachers combined"
            raise NonFiniteLogitsError(f"{who} produced NaN/Inf logits at position {p} of sequence "
                                       f"{sample(r)}; nothing of its chunk was written")
        return raise_at


@torch.inference_mode()
def compute_chunk(members: list[LanguageModel], data, writer: StoreWriter, i: int, batch_size: int,
                  device: torch.device, fused: FusedHead | None, slice_bytes: int = SLICE_BYTES) -> ChunkTargets:
    """Targets of chunk ``i`` (rows in store order: ``data`` is the reordered set). With ``fused`` (the store's
    ``teacher_stride`` above 1), the combined values come from one accumulated product per slice and each
    member's statistics from a sample of positions (:class:`TeacherSample`); otherwise from the members'
    logits."""
    meta = writer.meta
    start, stop = writer.bounds(i)
    out = ChunkTargets(meta, stop - start, i)
    v = meta.num_classes
    members_slices = Slices(len(members), v, slice_bytes)
    slices = Slices(1, v, slice_bytes) if fused else members_slices
    sample = TeacherSample(out, members, meta.sequence.teacher_stride, members_slices) if fused else None
    tokens_all, mask_all = data.get_batch(np.arange(start, stop))
    for b0 in range(0, stop - start, batch_size):
        b1 = min(b0 + batch_size, stop - start)
        tokens, mask = tokens_all[b0:b1].to(device), mask_all[b0:b1].to(device)
        x = tokens[:, :-1]
        batch = Batch(slice(b0, b1), [m.hidden(x) for m in members], tokens[:, 1:], mask)
        refuse = batch.refuse(members, lambda r: int(data.sample_of(np.array([start + b0 + r]))[0]), v)
        _encode_targets(out, batch, members, fused, refuse, slices)
        if sample is not None:
            sample.add(batch, start + b0)
    if sample is not None:
        sample.flush()
    out.tokens, out.mask = tokens_all.numpy(), mask_all.numpy()
    return out


def _encode_targets(out: ChunkTargets, batch: Batch, members: list[LanguageModel], fused: FusedHead | None,
                    refuse: Callable[[int, int], None], slices: Slices) -> None:
    """Encode a batch's targets slice by slice (with each member's statistics where its logits exist)."""
    b, length = batch.y.shape
    s = slices.size(b, length)
    for p0 in range(0, length, s):
        pos = slice(p0, min(p0 + s, length))
        z = None
        if fused is not None:
            ell = fused(batch.hidden, pos)
        else:
            z = member_logits(members, batch.hidden, pos, out.meta.num_classes)
            ell = combine(z, out.meta.combine, out.meta.temperature)
        out.add(batch.rows, pos, ell, batch.y[:, pos], batch.mask[:, pos], lambda r, p: refuse(r, p0 + p))
        if z is not None:
            out.count_teachers(z, batch.y[:, pos], batch.mask[:, pos])


class TeacherSample:
    """Each member's own statistics at a sample of positions: position p of store row r where
    ``(p − r) mod stride = 0``. The offset cycles with the row, so every position of a row is sampled equally
    often over rows (the first positions, with the least context, are not over-represented). Their hidden
    states are gathered batch by batch and the members' logits made for :data:`TEACHER_FLUSH` positions at a
    time."""

    def __init__(self, out: ChunkTargets, members: list[LanguageModel], stride: int, slices: Slices):
        self.out, self.members, self.stride, self.slices = out, members, stride, slices
        self.parts: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = []
        self.held = 0

    def positions(self, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, n] the sampled positions of store rows ``rows`` (clamped into the row) and whether each is real."""
        n = -(-length // self.stride)
        pos = rows[:, None] % self.stride + self.stride * torch.arange(n, device=rows.device)
        return pos.clamp_max(length - 1), pos < length

    def add(self, batch: Batch, first_row: int) -> None:
        b, length = batch.y.shape
        pos, real = self.positions(torch.arange(first_row, first_row + b, device=batch.y.device), length)
        hidden = [h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])) for h in batch.hidden]
        keep = batch.mask.gather(1, pos).bool() & real
        self.parts.append((hidden, batch.y.gather(1, pos), keep))
        self.held += pos.numel()
        if self.held >= TEACHER_FLUSH:
            self.flush()

    def flush(self) -> None:
        """The members' logits at the gathered positions, slice by slice, and their statistics."""
        if not self.parts:
            return
        # one row of every gathered position: [1, N, H] hidden states, [1, N] labels and mask
        hidden = [torch.cat([p[0][j].flatten(0, 1) for p in self.parts])[None] for j in range(len(self.members))]
        y, keep = (torch.cat([p[i].flatten() for p in self.parts])[None] for i in (1, 2))
        self.parts, self.held = [], 0
        n = y.shape[1]
        s = self.slices.size(1, n)
        for p0 in range(0, n, s):
            pos = slice(p0, min(p0 + s, n))
            z = member_logits(self.members, hidden, pos, self.out.meta.num_classes)
            self.out.count_teachers(z, y[:, pos], keep[:, pos])


def run_sequence_chunks(job, writer: StoreWriter, chunks: Sequence[int], *, batch_size: int = 8,
                        on_rows: Callable[[int], None] | None = None,
                        on_chunk: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None, slice_bytes: int = SLICE_BYTES) -> int:
    """Compute and commit ``chunks`` of a sequence store (see :func:`teacher_service.generate.run_chunks`)."""
    meta = writer.meta
    data = in_store_order(job.data, meta)
    fused = FusedHead.of(job.members, meta.combine, meta.num_classes) if meta.sequence.teacher_stride > 1 else None
    written = 0
    for i in chunks:
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped before chunk {i}; {written} rows were committed in this run")
        start, stop = writer.bounds(i)
        t = compute_chunk(job.members, data, writer, i, batch_size, job.device, fused, slice_bytes)
        writer.write_chunk(i, tokens=t.tokens, loss_mask=t.mask, index=data.sample_of(np.arange(start, stop)),
                           stats=t.stats, nll=t.nll, teacher_positions=t.teacher_positions, **t.parts)
        written += stop - start
        if on_rows:
            on_rows(stop - start)
        if on_chunk:
            on_chunk(i, stop - start)
    return written



def prepare_engine_sequences(spec, data, *, device: torch.device, roots, allow_code: bool, max_params: int | None,
                             environ) -> PreparedJob:
    """Engine teachers connected and checked against the text transfer set, the local ones beside them loaded;
    the sequence store's metadata with the engines' record (:mod:`teacher_service.engines`)."""
    engines, engine = connect_engines(spec, data, roots=roots, environ=environ)
    own = [m for m in spec.teachers.members if m.engine is None]
    local = load_members(spec.model_copy(update={"teachers": spec.teachers.model_copy(update={"members": own})}),
                         data, device=device, allow_code=allow_code, roots=roots, max_params=max_params) if own else []
    queues = {True: iter(engines), False: iter(local)}
    members = [next(queues[m.engine is not None]) for m in spec.teachers.members]
    meta = store_meta(spec, [m.loaded if isinstance(m, LanguageModel) else m for m in members], data, data.tokenizer.vocab_size,
                      None, sequence=sequence_record(data),
                      targets=targets_record(spec, data.tokenizer.vocab_size, "tokens"), engine=engine)
    return PreparedJob(spec, members, data, meta, device, roots=roots, allow_code=allow_code)


class TokenTeachers(TeacherKind):
    name = Tokens.name

    def prepare(self, spec, data, *, device, allow_code, roots, max_params, channels_last):
        """Local teachers loaded onto ``device``, or engine members connected (their API keys read from this
        process's environment, by the names the job gives)."""
        if uses_engines(spec):
            return prepare_engine_sequences(spec, data, device=device, roots=roots, allow_code=allow_code,
                                            max_params=max_params, environ=os.environ)
        return prepare_sequences(spec, data, device=device, allow_code=allow_code, roots=roots, max_params=max_params)

    def run(self, job, writer, chunks, *, batch_size, on_rows, on_chunk, should_stop, **options):
        """Token rows computed a slice of positions at a time (the DataLoader and writer options of classes do
        not apply), or requested from the job's engines."""
        if writer.meta.sequence.responses is not None:
            return run_response_chunks(job, writer, chunks, batch_size=batch_size, on_rows=on_rows, on_chunk=on_chunk,
                                       should_stop=should_stop)
        if writer.meta.engine is not None:
            return run_engine_chunks(job, writer, chunks, on_rows=on_rows, on_chunk=on_chunk, should_stop=should_stop,
                                     roots=job.roots, allow_code=job.allow_code, batch_size=batch_size)
        return run_sequence_chunks(job, writer, chunks, batch_size=batch_size, on_rows=on_rows, on_chunk=on_chunk,
                                   should_stop=should_stop)

    def default_batch(self, meta):
        """Token rows of about 8,192 positions."""
        return max(1, 8192 // meta.sequence.length)
