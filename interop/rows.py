"""A sequence store's rows as the top-K formats of other tools see them: each row's tokens, which positions carry
a loss, and at each position the K most likely next tokens with their normalised log-probabilities and the log
of the mass left out. Read chunk by chunk through the store's reader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from storage import StoreReader
from storage.fields import target_fields
from storage.forms import form_of
from storage.kinds import kind_of


@dataclass
class TokenChunk:
    """One committed chunk's ``r`` rows, whole (``L`` positions each), with the ``n`` positions each keeps
    (trailing padding without a loss dropped): ``tokens`` [r, L + 1] (the inputs and the last label), ``mask``
    [r, L] (whether position t's label ``tokens[t + 1]`` and targets carry a loss), ``ids``/``logp`` [r, L, K]
    (most likely first) and ``tail`` [r, L]."""

    rows: np.ndarray  # [r] the rows' numbers in the store
    index: np.ndarray  # [r] the transfer-set record (sample) each row was made from
    n: np.ndarray  # [r] positions kept per row
    tokens: np.ndarray
    mask: np.ndarray
    ids: np.ndarray
    logp: np.ndarray
    tail: np.ndarray

    @property
    def positions(self) -> int:
        return int(self.n.sum())


def check_token_store(reader: StoreReader, what: str, k: int | None) -> int:
    """Refuse (SpecError, one line) a store whose rows or targets ``what`` cannot hold; the K it writes."""
    meta = reader.meta
    kind_of(meta).check_token_rows(meta, what)
    probe = {name: torch.zeros((1, 1, *reader.array(name).shape[2:]), dtype=_dtype(reader.array(name).dtype))
             for name in target_fields(meta)}
    ids, _, _ = form_of(meta).top_logprobs(probe, meta, k)
    return int(ids.shape[-1])


def _dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype).newbyteorder("="))).dtype


def token_chunks(reader: StoreReader, k: int | None) -> Iterator[TokenChunk]:
    """Every committed chunk of ``reader`` as a :class:`TokenChunk`, in row order."""
    meta = reader.meta
    form, names = form_of(meta), target_fields(meta)
    pad = meta.sequence.tokenizer.pad_id
    pad = meta.sequence.tokenizer.eos_id if pad is None else pad
    for c in reader.finished_chunks():
        got = reader.read_chunks([c], ["tokens", "loss_mask", "index", *names])
        parts = {name: torch.from_numpy(np.ascontiguousarray(got[name])) for name in names}
        ids, logp, tail = (t.numpy() for t in form.top_logprobs(parts, meta, k))
        a, b = reader.bounds(c)
        yield TokenChunk(np.arange(a, b), got["index"].astype(np.int64),
                         _lengths(got["tokens"], got["loss_mask"], pad), got["tokens"].astype(np.int64),
                         got["loss_mask"].astype(bool), ids, logp, tail)


def _lengths(tokens: np.ndarray, mask: np.ndarray, pad: int | None) -> np.ndarray:
    """[r] positions kept per row: all but the trailing ones without a loss whose label is the padding token."""
    length = mask.shape[1]
    if pad is None:
        return np.full(len(mask), length)
    padding = (mask == 0) & (tokens[:, 1:] == pad)
    trailing = np.cumprod(padding[:, ::-1], axis=1).sum(1)
    return np.maximum(length - trailing, 1)
