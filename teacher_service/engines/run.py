"""Token rows captured from inference engines: a job whose teachers are all engine members.

Preparing checks every member's server against the job before any row is sent (:meth:`VllmServer.check`) and
records what each engine reported in the store (``meta.engine``). Running sends each chunk's rows, a few per
request, with at most ``max_in_flight`` requests open per member, and fetches the next chunk's answers while
the current one is combined and written; an answer is checked whole, and a chunk is committed only once every
request of it succeeded, so a server that restarts mid-job costs the requests in flight (retried), never a
wrong chunk. On the job's first chunk the engine's log-probabilities are compared with the member's local
weights run through ``transformers`` (:func:`reference_kl`).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from darkstore.errors import SpecError
from darkstore.lm import check_tokenizer, load_lm, tokenizer_path
from darkstore.modelspec import ModelSpec
from storage import StoreWriter
from storage.forms import form_of
from storage.schema import EngineMemberRecord, EngineRecord

from ..errors import EngineMismatchError
from ..prepared import Cancelled, PreparedJob, in_store_order
from .capture import combine_members, tail_floor
from .offline import VllmOffline
from .vllm import Scored, VllmServer, engine_digest

log = logging.getLogger(__name__)

#: bound on the reference's [positions, vocabulary] float64 log-probabilities at a time
REFERENCE_BYTES = 64 << 20
#: bound on the local members' [members, rows, positions, vocabulary] float64 log-probabilities at a time
LOCAL_BYTES = 32 << 20


@dataclass
class EngineTeacher:
    """An engine member as the job sees it: its spec, its server and what the server reported (with the
    attributes a store's teacher record reads)."""

    spec: ModelSpec
    server: VllmServer | VllmOffline
    record: EngineMemberRecord
    sha256: str
    weights_path: Path | None = None
    format: str = "engine"
    num_params: int = 0
    pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.label

    @property
    def rows_per_request(self) -> int | None:
        """Rows a request takes (None: a whole chunk at once, for an engine in this process)."""
        return self.spec.engine.rows_per_request if self.server.concurrent else None

    def submit(self, rows: np.ndarray, k: int, vocab: int) -> Future:
        if self.pool is None:
            n = self.spec.engine.max_in_flight if self.server.concurrent else 1
            self.pool = ThreadPoolExecutor(n, thread_name_prefix=f"engine-{self.name}")
        return self.pool.submit(self.server.score, rows, k, vocab)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.server.close()


def uses_engines(spec) -> bool:
    """Whether any of the job's teachers is an engine member."""
    return any(m.engine is not None for m in spec.teachers.members)


def check_engine_job(spec) -> None:
    """Refuse what engines' answers cannot serve, one line each."""
    spec.targets.spec.check_from_engine(spec.targets)
    if spec.temperature != 1.0:
        raise SpecError(f"engine teachers give log-probabilities at T=1 and the store keeps them so (temperature "
                        f"{spec.temperature:g} asked): generate at 1 and train at any T (--temperature)")


def connect_engines(spec, data, *, roots: Sequence[str | Path] | None, environ: Mapping[str, str]
                    ) -> tuple[list[EngineTeacher], EngineRecord]:
    """The engine members connected and checked against the job and its transfer set (tokenizer, context
    length, log-probabilities per position), and the store's record of them."""
    check_engine_job(spec)
    k = spec.targets.k
    probe = _probe_text(data)
    servers: list[VllmServer | VllmOffline] = []
    members = []
    try:
        for m in spec.teachers.members:
            if m.engine is None:
                continue
            check_tokenizer(m, tokenizer_path(m, roots), data.tokenizer)
            server = VllmServer.connect(m, dict(environ)) if m.engine.url else VllmOffline(m, roots)
            servers.append(server)
            record = server.check(k=k, length=data.length, tokenizer=data.tokenizer, sample_text=probe)
            members.append(EngineTeacher(m, server, record, engine_digest(m, record, roots),
                                         Path(m.weights) if m.weights else None))
    except BaseException:
        for s in servers:
            s.close()
        raise
    return members, EngineRecord(members=[t.record for t in members], tail_floor=tail_floor(k))


def _probe_text(data) -> str:
    """Some of the transfer set's text, as its tokenizer decodes the first rows."""
    tokens, _ = data.get_batch(np.arange(min(4, len(data))))
    text = data.tokenizer.tokenizer.decode(tokens.reshape(-1).tolist(), skip_special_tokens=True)
    return text[:2000]


class ChunkRequests:
    """One chunk's rows sent to every member, ``rows_per_request`` rows a request: futures of their answers."""

    def __init__(self, members: Sequence[EngineTeacher], tokens: np.ndarray, mask: np.ndarray, k: int, vocab: int):
        self.tokens, self.mask = tokens, mask
        self.futures = []
        for t in members:
            step = t.rows_per_request or len(tokens)
            self.futures.append([t.submit(tokens[r:r + step], k, vocab) for r in range(0, len(tokens), step)])

    def answers(self) -> list[Scored]:
        """Every member's answers for the chunk's rows, in row order (waits; raises the first failure)."""
        out = []
        for futures in self.futures:
            parts = [f.result() for f in futures]
            out.append(Scored(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("ids", "logp", "label"))))
        return out

    def cancel(self) -> None:
        for futures in self.futures:
            for f in futures:
                f.cancel()


def run_engine_chunks(job: PreparedJob, writer: StoreWriter, chunks: Sequence[int], *,
                      on_rows: Callable[[int], None] | None = None,
                      on_chunk: Callable[[int, int], None] | None = None,
                      should_stop: Callable[[], bool] | None = None, roots: Sequence[str | Path] | None = None,
                      allow_code: bool = False, batch_size: int = 8) -> int:
    """Compute and commit ``chunks`` of an engine store, the next chunk's requests sent while the current one
    is combined and written (see the module's docstring)."""
    meta = writer.meta
    data = in_store_order(job.data, meta)
    k, vocab = meta.targets.k, meta.num_classes
    written = 0

    def send(i: int) -> ChunkRequests:
        start, stop = writer.bounds(i)
        engines = [m for m in job.members if isinstance(m, EngineTeacher)]
        tokens, mask = (t.numpy() for t in data.get_batch(np.arange(start, stop)))
        return ChunkRequests(engines, tokens, mask, k, vocab)

    pending = current = send(chunks[0]) if chunks else None
    try:
        for n, i in enumerate(chunks):
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped before chunk {i}; {written} rows were committed in this run")
            current, pending = pending, (send(chunks[n + 1]) if n + 1 < len(chunks) else None)
            start, stop = writer.bounds(i)
            tokens, mask = current.tokens, current.mask
            answers = current.answers()
            kl = reference_kl(job, answers, tokens, mask, roots=roots, allow_code=allow_code) if i == 0 else None
            writer.write_chunk(i, tokens=tokens, loss_mask=mask, index=data.sample_of(np.arange(start, stop)),
                               reference_kl=kl, **chunk_fields(job, answers, tokens, mask, batch_size))
            written += stop - start
            if on_rows:
                on_rows(stop - start)
            if on_chunk:
                on_chunk(i, stop - start)
    except BaseException:
        if current is not None:  # the failing chunk's other requests are not waited for
            current.cancel()
        raise
    finally:
        if pending is not None:
            pending.cancel()
    return written


@dataclass
class ChunkCombined:
    """A chunk's combined answers, position by position ([rows · L, ...]), and each member's own statistics."""

    head: np.ndarray
    idx: np.ndarray
    tail: np.ndarray
    label: np.ndarray
    log_z: np.ndarray
    member_hit: np.ndarray  # [M, rows · L] the member's most likely token is the label
    member_label: np.ndarray  # [M, rows · L] the label's log-probability under the member
    floored: int = 0
    estimated: int = 0


def combine_chunk(job: PreparedJob, answers: list[Scored], tokens: np.ndarray, batch_size: int) -> ChunkCombined:
    """The engines' answers for a chunk's rows, with the local members' log-probabilities computed a batch of
    rows and a slice of positions at a time (every token's value, in float64, within :data:`LOCAL_BYTES`)."""
    k, v = job.meta.targets.k, job.meta.num_classes
    rows, length = tokens.shape[0], tokens.shape[1] - 1
    local = [m for m in job.members if not isinstance(m, EngineTeacher)]
    n = rows * length
    out = ChunkCombined(np.empty((n, k)), np.empty((n, k), dtype=np.int64), np.empty(n), np.empty(n), np.empty(n),
                        np.empty((len(job.members), n), dtype=bool), np.empty((len(job.members), n)))
    batch = batch_size if local else rows
    for b0 in range(0, rows, batch):
        b1 = min(b0 + batch, rows)
        x = torch.from_numpy(tokens[b0:b1, :-1].astype(np.int64)).to(job.device)
        with torch.inference_mode():
            hidden = [m.hidden(x) for m in local]
        step = length if not local else max(1, LOCAL_BYTES // (8 * len(local) * (b1 - b0) * v))
        for p0 in range(0, length, step):
            pos = slice(p0, min(p0 + step, length))
            at = (np.arange(b0, b1)[:, None] * length + np.arange(length)[pos]).ravel()
            _combine_slice(out, job, answers, hidden, local, tokens[b0:b1, 1:][:, pos].reshape(-1), b0, b1, pos, at)
    return out


def _combine_slice(out: ChunkCombined, job, answers, hidden, local, y, b0, b1, pos, at) -> None:
    k, v = job.meta.targets.k, job.meta.num_classes
    with torch.inference_mode():
        dense = [torch.log_softmax(m.logits(h[:, pos])[..., :v].double(), -1).reshape(-1, v).cpu().numpy()
                 for m, h in zip(local, hidden)]
    parts = [(a.ids[b0:b1, pos].reshape(-1, k), a.logp[b0:b1, pos].reshape(-1, k), a.label[b0:b1, pos].reshape(-1))
             for a in answers]
    rows = np.arange(len(y))
    c = combine_members([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                        vocab=v, k=k, rule=job.meta.combine, dense=dense, dense_labels=[d[rows, y] for d in dense])
    out.head[at], out.idx[at], out.tail[at], out.label[at], out.log_z[at] = c.head, c.idx, c.tail, c.label, c.log_z
    out.floored += c.floored
    out.estimated += c.estimated
    engines, locals_ = iter(parts), iter(dense)
    for j, m in enumerate(job.members):
        if isinstance(m, EngineTeacher):
            _, lp, lab = next(engines)
            out.member_hit[j, at], out.member_label[j, at] = lab >= lp[:, 0], lab
        else:
            d = next(locals_)
            out.member_hit[j, at], out.member_label[j, at] = d[rows, y] >= d.max(1), d[rows, y]


def chunk_fields(job: PreparedJob, answers: list[Scored], tokens: np.ndarray, mask: np.ndarray,
                 batch_size: int) -> dict[str, Any]:
    """A chunk's target fields and statistics from the engines' answers for its rows (and the local members')."""
    meta, k = job.meta, job.meta.targets.k
    rows, length = tokens.shape[0], tokens.shape[1] - 1
    c = combine_chunk(job, answers, tokens, batch_size)
    head = np.maximum(c.head, c.head.max(1, keepdims=True) - 1e4)  # a returned p = 0: stored 10⁴ nats down
    parts = form_of(meta).encode_kept(torch.from_numpy(head).view(rows, length, k),
                                      torch.from_numpy(c.idx).view(rows, length, k),
                                      torch.from_numpy(c.tail).view(rows, length), meta)
    keep = mask.reshape(-1).astype(bool)
    hits = [c.label >= c.head.max(1), *c.member_hit]
    stats = np.array([keep.sum()] + [(h & keep).sum() for h in hits], dtype=np.int64)
    nll = np.array([(c.log_z - c.label)[keep].sum()] + [-lab[keep].sum() for lab in c.member_label])
    return {**{name: t.numpy() for name, t in parts.items()}, "stats": stats, "nll": nll,
            "teacher_positions": int(keep.sum()), "engine_counts": np.array([c.floored, c.estimated])}


def reference_kl(job: PreparedJob, answers: list[Scored], tokens: np.ndarray, mask: np.ndarray, *,
                 roots: Sequence[str | Path] | None, allow_code: bool) -> np.ndarray:
    """[M] each member's mean KL per token from the engine's answers to its own weights run through
    ``transformers`` on the chunk's first ``reference_rows`` rows (NaN for a member with no local weights);
    above ``max_kl`` the job stops (:class:`EngineMismatchError`) before anything of the chunk is written."""
    out = np.full(len(job.members), np.nan)
    engines = [(j, t) for j, t in enumerate(job.members) if isinstance(t, EngineTeacher)]
    for (j, t), a in zip(engines, answers):
        n = min(t.spec.engine.reference_rows, len(tokens))
        if not t.spec.weights or n == 0:
            continue
        lm = load_lm(t.spec.model_copy(update={"engine": None}), vocab_size=job.meta.num_classes,
                     allow_code=allow_code, roots=roots, tokenizer=job.data.tokenizer)
        keep = mask[:n].astype(bool) if mask[:n].any() else np.ones(mask[:n].shape, dtype=bool)
        kl = _kl_rows(lm, tokens[:n], a.ids[:n], a.logp[:n], job.meta.num_classes)
        out[j] = float(kl[keep].mean())
        log.info("engine %s: mean KL %.3g nats per token to its weights through transformers (%d positions)",
                 t.name, out[j], int(keep.sum()))
        if out[j] > t.spec.engine.max_kl:
            raise EngineMismatchError(
                f"engine teacher {t.name!r} differs from its weights run through transformers: mean KL {out[j]:.3g} "
                f"nats per token on {int(keep.sum())} positions of the first rows, above max_kl "
                f"{t.spec.engine.max_kl:g} (another model, revision or precision?); nothing was written")
    return out


@torch.inference_mode()
def _kl_rows(lm, tokens: np.ndarray, ids: np.ndarray, logp: np.ndarray, vocab: int) -> np.ndarray:
    """[r, L] KL(engine ‖ reference) per position over the engine's K tokens and the rest as one outcome, the
    reference's log-probabilities in float64 a slice of positions at a time."""
    r, length, k = ids.shape
    step = max(1, REFERENCE_BYTES // (8 * vocab))
    p_tail = np.maximum(1.0 - np.exp(logp).sum(-1), 0.0)
    out = np.zeros((r, length))
    for i in range(r):
        h = lm.hidden(torch.from_numpy(tokens[i:i + 1, :-1].astype(np.int64)))
        for p0 in range(0, length, step):
            q = torch.log_softmax(lm.logits(h[:, p0:p0 + step])[0, :, :vocab].double(), -1).numpy()
            q_head = np.take_along_axis(q, ids[i, p0:p0 + step], 1)
            q_tail = np.log(np.maximum(1.0 - np.exp(q_head).sum(-1), 1e-300))
            lp, pt = logp[i, p0:p0 + step], p_tail[i, p0:p0 + step]
            with np.errstate(divide="ignore", invalid="ignore"):
                head_kl = np.where(np.isfinite(lp), np.exp(lp) * (lp - q_head), 0.0).sum(-1)
                tail_kl = np.where(pt > 0, pt * (np.log(pt) - q_tail), 0.0)
            out[i, p0:p0 + step] = head_kl + tail_kl
    return out
