"""How a language-model student does on held-out token rows, in the terms language-model people read.

Over the positions with a loss: the student's perplexity (exp of its mean NLL of the next token), bits per
byte (its NLL over the bytes of the text, by the store's bytes per token), top-1 accuracy (its most likely
token is the next one), top-1 agreement with the teachers (its most likely token is theirs), and the teachers'
own perplexity on the same positions, as far as the store's form tells:

- ``dense``: exact;
- ``topk``: exact where the next token is among the K kept; elsewhere the tail's mass is spread evenly over
  the tokens left out (``teacher_in_topk`` says how often the token was kept);
- ``sampled``: not known per position (K draws do not give a probability); agreement is with the most drawn
  token.

With an eval store evaluated whole, its generation's record gives the teachers' exact perplexity instead
(``teacher_perplexity_source``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from storage import StoreReader
from storage.errors import SchemaError
from storage.forms import form_of
from storage.location import canonical

from .eval_cache import HOLDOUT_SEED, KeptRows
from .eval_report import teacher_size
from .loader import Batch, make_loader

#: token eval rows kept in memory across epochs and students, when they fit
EVAL_CACHE_MB = 512.0
#: rows per eval batch
EVAL_BATCH = 32


class TokenEvalRows(KeptRows):
    """Token rows (batches as the loader gives them), kept up to ``EVAL_CACHE_MB``; ``whole_store``: the rows
    are a whole eval store's (its generation measured the teachers' perplexity on them exactly)."""

    limit_mb = EVAL_CACHE_MB

    def __init__(self, reader: StoreReader, rows: np.ndarray, *, whole_store: bool = False):
        super().__init__(reader, rows)
        self.whole_store = whole_store

    def _read(self) -> Iterator[Batch]:
        yield from make_loader(self.reader, self.rows, batch_size=EVAL_BATCH, shuffle=False).epoch(0)

    def _nbytes(self, b: Batch) -> int:
        return b.x.nbytes + b.labels.nbytes + sum(v.nbytes for v in b.stored().values())


def teacher_top1(parts: dict[str, torch.Tensor], meta) -> torch.Tensor:
    """[n] the teachers' most likely token at each position, as far as the stored fields tell."""
    return form_of(meta).top1(parts, meta)


class _Sums:
    def __init__(self):
        self.n = self.nll = self.top1 = self.agree = self.t_nll = 0.0
        self.t_kept: float | None = None

    def add(self, logp: torch.Tensor, y: torch.Tensor, parts: dict[str, torch.Tensor], meta) -> None:
        form = form_of(meta)
        s1 = logp.argmax(-1)
        self.n += len(y)
        self.nll -= float(logp.gather(1, y[:, None]).double().sum())
        self.top1 += float((s1 == y).sum())
        self.agree += float((s1 == form.top1(parts, meta)).sum())
        if form.logp_source is not None:
            t = form.teacher_logp(parts, meta)
            self.t_nll -= float(t.gather(1, y[:, None]).double().sum())
        kept = form.kept(parts, y)
        if kept is not None:
            self.t_kept = (self.t_kept or 0.0) + float(kept.sum())


@torch.no_grad()
def evaluate_tokens(hidden: Callable[[torch.Tensor], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                    ev: TokenEvalRows, *, device: str, slice_positions: int) -> dict[str, Any]:
    """The student's (``hidden`` then ``head``) metrics over ``ev``'s positions with a loss (module docstring)."""
    meta = ev.reader.meta
    sums = _Sums()
    for b in ev.batches():
        b = b.to(device)
        keep = (b.labels >= 0).flatten().nonzero().squeeze(1)
        h = hidden(b.x).flatten(0, 1).index_select(0, keep)
        y = b.labels.flatten().index_select(0, keep)
        parts = {k: v.flatten(0, 1).index_select(0, keep) for k, v in b.stored().items()}
        for a in range(0, len(keep), slice_positions):
            z = slice(a, a + slice_positions)
            sums.add(torch.log_softmax(head(h[z]).float(), dim=-1), y[z], {k: v[z] for k, v in parts.items()},
                     meta)
    return summarise(sums, ev)


def summarise(sums: _Sums, ev: TokenEvalRows) -> dict[str, Any]:
    meta = ev.reader.meta
    if sums.n == 0:
        return {}
    seq = meta.sequence
    bytes_per_token = seq.text_bytes / seq.positions if seq.positions and seq.text_bytes else None
    nll = sums.nll / sums.n
    out: dict[str, Any] = {"perplexity": math.exp(nll), "nll": nll, "top1": sums.top1 / sums.n,
                           "agreement": sums.agree / sums.n, "positions": int(sums.n)}
    if bytes_per_token:
        out["bits_per_byte"] = nll / math.log(2) / bytes_per_token
    t_nll, source = None, None
    if ev.whole_store and ev.reader.perplexity():
        t_nll, source = math.log(ev.reader.perplexity()["ensemble"]), "the eval store's generation (exact)"
    elif form_of(meta).logp_source is not None:
        t_nll, source = sums.t_nll / sums.n, form_of(meta).logp_source
    if t_nll is not None:
        out.update({"teacher_perplexity": math.exp(t_nll), "teacher_perplexity_source": source})
        if bytes_per_token:
            out["teacher_bits_per_byte"] = t_nll / math.log(2) / bytes_per_token
    if sums.t_kept is not None:
        out["teacher_in_topk"] = sums.t_kept / sums.n
    return out


TEACHER_KEYS = {"teacher_perplexity": "perplexity", "teacher_bits_per_byte": "bits_per_byte",
                "teacher_perplexity_source": "source", "teacher_in_topk": "in_topk"}


def lm_report(flat: dict[str, Any], reader: StoreReader, rows: np.ndarray, *, params: int,
              weights_path: Path | None) -> dict[str, Any]:
    """eval.json of a language-model run, shaped as a class run's: the store and rows, the student's
    ``metrics``, the teachers' (``teacher_metrics``) and their sizes against the student's (``compression``)."""
    student = {k: v for k, v in flat.items() if k not in TEACHER_KEYS and k != "positions"}
    teachers = {TEACHER_KEYS[k]: v for k, v in flat.items() if k in TEACHER_KEYS}
    st = {"params": params, "size_bytes": weights_path.stat().st_size if weights_path else None}
    te = teacher_size(reader)
    ratios = {"params": te["params"] / max(1, params)}
    if te.get("size_bytes") and st.get("size_bytes"):
        ratios["size"] = te["size_bytes"] / st["size_bytes"]
    return {"store": canonical(reader.location), "rows": int(len(rows)), "positions": flat.get("positions", 0),
            "metrics": student, "teacher_metrics": teachers,
            "compression": {"student": st, "teachers": te, "teachers_over_student": ratios}}


def sequence_split(reader, holdout: float, ev_reader) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): all finished rows and the eval store's, or a fixed holdout of rows (the same
    rows for every student of the store)."""
    rows = reader.finished_rows()
    if ev_reader is not None:
        return rows, ev_reader.finished_rows()
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(len(rows))
    k = int(round(len(rows) * holdout))
    return np.sort(rows[perm[k:]]), np.sort(rows[perm[:k]])


def check_eval_store(meta, ev_meta, path) -> None:
    """An eval store for a sequence store: token rows of the same tokenizer."""
    if ev_meta.kind is not meta.kind:
        raise SchemaError(f"the eval store {path} holds {ev_meta.kind.name}; the training store holds "
                          f"{meta.kind.name}")
    ours, theirs = meta.sequence.tokenizer, ev_meta.sequence.tokenizer
    if ours.fingerprint != theirs.fingerprint:
        raise SchemaError(f"the eval store {path} was tokenized by another tokenizer ({theirs.vocab_size} tokens, "
                          f"{theirs.path}) than the training store ({ours.vocab_size} tokens, {ours.path}): their "
                          "fingerprints differ")
