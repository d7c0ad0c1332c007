"""Generation for language models: per-position targets of an LM ensemble over token rows.

A row is a token sequence (:mod:`darkstore.text`); each member's backbone runs once per batch, then the
output heads, the combination and the target form's encoding run on a slice of positions at a time, sized so
that [members, batch, slice, vocabulary] float32 stays within ``slice_bytes``: memory is bounded whatever the
vocabulary and the length. Per chunk the store also gets the tokens, the loss mask, top-1 counts (stats) and
the summed negative log-likelihoods of the labels (nll) for the ensemble and each member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from darkstore.errors import SpecError
from darkstore.lm import LanguageModel, check_fit, load_lm
from storage import FLOAT16_FLOOR, StoreMeta, StoreWriter
from storage.errors import NonFiniteLogitsError
from storage.fields import BY_NAME
from storage.forms import form_of
from storage.schema import SequenceRecord, TokenizerRecord

from .combine import combine

#: default bound on one slice's [members, batch, positions, vocabulary] float32 logits
SLICE_BYTES = 16 << 20
#: the largest vocabulary a dense sequence store takes (above it, every position would cost megabytes)
DENSE_VOCAB = 4096


def load_members(spec, data, *, device: torch.device, allow_code: bool, roots, max_params: int | None
                 ) -> list[LanguageModel]:
    """Every LM member loaded, fitted to the transfer set's tokenizer and length, on ``device`` in eval mode."""
    from .generate import check_param_budget

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


def sequence_record(data) -> SequenceRecord:
    tok = data.tokenizer
    return SequenceRecord(length=data.length, packing=data.spec.packing, positions=data.positions,
                          text_bytes=data.rows.text_bytes,
                          tokenizer=TokenizerRecord(path=tok.path, fingerprint=tok.fingerprint,
                                                    vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id))


def check_dense(spec, vocab: int) -> None:
    """Dense targets of a large vocabulary are refused: every position would cost megabytes."""
    if spec.targets.form == "dense" and vocab > DENSE_VOCAB:
        raise SpecError(f"dense targets keep all {vocab:,} tokens at every position; above {DENSE_VOCAB:,} ask for "
                        "topk:K or sampled:K")


def prepare_sequences(spec, data, *, device: torch.device, allow_code: bool, roots, max_params: int | None):
    """The LM teachers loaded and checked against the text transfer set; the sequence store's metadata."""
    from .generate import PreparedJob, _targets, store_meta

    vocab = data.tokenizer.vocab_size
    check_dense(spec, vocab)
    targets = _targets(spec, vocab, "tokens")
    members = load_members(spec, data, device=device, allow_code=allow_code, roots=roots, max_params=max_params)
    meta = store_meta(spec, [m.loaded for m in members], data, vocab, None, sequence=sequence_record(data),
                      targets=targets)
    return PreparedJob(spec, members, data, meta, device)


@dataclass
class Slices:
    """How many positions one slice of a batch takes (its logits within the byte bound)."""

    members: int
    vocab: int
    budget: int = SLICE_BYTES

    def size(self, batch: int, length: int) -> int:
        return max(1, min(length, self.budget // (4 * self.members * batch * self.vocab)))


class ChunkTargets:
    """One chunk's stored arrays, filled slice by slice."""

    def __init__(self, meta: StoreMeta, rows: int, chunk: int):
        self.meta, self.form, self.rows = meta, form_of(meta), rows
        self.length = meta.sequence.length
        self.draws = self.form.draws(meta, chunk, (rows, self.length))
        self.parts: dict[str, np.ndarray] = {}
        self.stats = np.zeros(2 + meta.num_members, dtype=np.int64)
        self.nll = np.zeros(1 + meta.num_members, dtype=np.float64)
        self.tokens: np.ndarray | None = None  # the chunk's rows, set once its targets are computed
        self.mask: np.ndarray | None = None

    def add(self, rows: slice, pos: slice, z: torch.Tensor, top: torch.Tensor, y: torch.Tensor,
            mask: torch.Tensor) -> None:
        """Encode [M, b, s, V] member logits of rows × positions (``top``: each one's largest per position);
        count the masked positions' statistics."""
        meta = self.meta
        ell = combine(z, meta.combine, meta.temperature)
        log_z = torch.logsumexp(ell, dim=-1)
        u = None if self.draws is None else self.draws[rows, pos]
        parts = self.form.encode(ell, meta, u, log_z)
        for name, t in parts.items():
            if BY_NAME[name].log_space and t.is_floating_point() and meta.dtype == "float16":
                t = t.clamp_min(FLOAT16_FLOOR).half()
            arr = self.parts.get(name)
            host = t.cpu().numpy()
            if arr is None:
                arr = self.parts[name] = np.empty((self.rows, self.length, *host.shape[2:]), dtype=host.dtype)
            arr[rows, pos] = host
        self._count(ell, log_z, z, top, y.long()[..., None], mask.bool())

    def _count(self, ell: torch.Tensor, log_z: torch.Tensor, z: torch.Tensor, top: torch.Tensor, y: torch.Tensor,
               keep: torch.Tensor) -> None:
        """Top-1 hits and summed NLL of the labels ``y`` [b, s, 1] at the kept positions: the ensemble's stored
        distribution at its generation temperature, each member's at T = 1. A label is a hit when its value is
        the largest (``top`` [M, b, s]: each member's; the centred ensemble's is 0), and its NLL is a log-sum-exp
        less a gather: no argmax or whole log-softmax passes."""
        t = self.meta.temperature
        at = ell.gather(-1, y)[..., 0]
        self.stats[0] += int(keep.sum())
        self.stats[1] += int(((at >= 0) & keep).sum())
        lse = log_z if t == 1 else torch.logsumexp(ell / t, -1)
        self.nll[0] += float((lse - at / t)[keep].double().sum())
        for j, zm in enumerate(z):
            at = zm.gather(-1, y)[..., 0]
            self.stats[2 + j] += int(((at >= top[j]) & keep).sum())
            self.nll[1 + j] += float((torch.logsumexp(zm, -1) - at)[keep].double().sum())


def _finite(z: torch.Tensor, members: Sequence[LanguageModel], rows: Callable[[], np.ndarray]) -> torch.Tensor:
    """Each member's largest logit per position [M, b, s], after refusing NaN or +Inf anywhere (amax propagates
    NaN; a −Inf logit is a token the teacher rules out, which its NLL reports if it occurs)."""
    hi = z.amax(dim=-1)
    bad = ~torch.isfinite(hi)
    if bool(bad.any()):
        j, r, p = (int(v) for v in bad.nonzero()[0])
        raise NonFiniteLogitsError(f"teacher {members[j].name!r} produced NaN/Inf logits at position {p} of "
                                   f"sequence {int(rows()[r])}; nothing of its chunk was written")
    return hi


@torch.inference_mode()
def compute_chunk(members: list[LanguageModel], data, writer: StoreWriter, i: int, batch_size: int,
                  device: torch.device, slices: Slices) -> ChunkTargets:
    """Targets of chunk ``i`` (rows in store order: ``data`` is the reordered set)."""
    meta = writer.meta
    start, stop = writer.bounds(i)
    out = ChunkTargets(meta, stop - start, i)
    v = meta.num_classes
    tokens_all, mask_all = data.get_batch(np.arange(start, stop))
    for b0 in range(0, stop - start, batch_size):
        b1 = min(b0 + batch_size, stop - start)
        tokens = tokens_all[b0:b1].to(device)
        mask = mask_all[b0:b1].to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        hidden = [m.hidden(x) for m in members]
        s = slices.size(b1 - b0, x.shape[1])
        for p0 in range(0, x.shape[1], s):
            p1 = min(p0 + s, x.shape[1])
            z = torch.empty(len(members), b1 - b0, p1 - p0, v, device=device)
            for j, (m, h) in enumerate(zip(members, hidden)):
                m.logits_into(h[:, p0:p1], z[j])
            top = _finite(z, members, lambda: data.sample_of(np.arange(start + b0, start + b1)))
            out.add(slice(b0, b1), slice(p0, p1), z, top, y[:, p0:p1], mask[:, p0:p1])
    out.tokens, out.mask = tokens_all.numpy(), mask_all.numpy()
    return out


def run_sequence_chunks(job, writer: StoreWriter, chunks: Sequence[int], *, batch_size: int = 8,
                        on_rows: Callable[[int], None] | None = None,
                        on_chunk: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None, slice_bytes: int = SLICE_BYTES) -> int:
    """Compute and commit ``chunks`` of a sequence store (see :func:`teacher_service.generate.run_chunks`)."""
    from .generate import Cancelled, in_store_order

    data = in_store_order(job.data, writer.meta)
    slices = Slices(len(job.members), writer.meta.num_classes, slice_bytes)
    written = 0
    for i in chunks:
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped before chunk {i}; {written} rows were committed in this run")
        start, stop = writer.bounds(i)
        t = compute_chunk(job.members, data, writer, i, batch_size, job.device, slices)
        writer.write_chunk(i, tokens=t.tokens, loss_mask=t.mask, index=data.sample_of(np.arange(start, stop)),
                           stats=t.stats, nll=t.nll, **t.parts)
        written += stop - start
        if on_rows:
            on_rows(stop - start)
        if on_chunk:
            on_chunk(i, stop - start)
    return written

