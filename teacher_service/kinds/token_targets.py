"""One chunk of a sequence store's targets as they are computed: the target form's arrays filled a slice of
positions (or a scattered set of positions) at a time, and the ensemble's and members' statistics."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from storage import FLOAT16_FLOOR, StoreMeta
from storage.fields import BY_NAME
from storage.forms import form_of


class ChunkTargets:
    """One chunk's stored arrays, filled slice by slice, and its statistics."""

    def __init__(self, meta: StoreMeta, rows: int, chunk: int):
        self.meta, self.form, self.rows = meta, form_of(meta), rows
        self.length = meta.sequence.length
        self.draws = self.form.draws(meta, chunk, (rows, self.length))
        self.parts: dict[str, np.ndarray] = {}
        self.stats = np.zeros(2 + meta.num_members, dtype=np.int64)
        self.nll = np.zeros(1 + meta.num_members, dtype=np.float64)
        self.teacher_positions = 0
        self.tokens: np.ndarray | None = None  # the chunk's rows, set once its targets are computed
        self.mask: np.ndarray | None = None

    def add(self, rows: slice, pos: slice, ell: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
            refuse: Callable[[int, int], None]) -> None:
        """Encode the combined values ``ell`` [b, s, V] of rows × positions, after refusing a position whose
        values are NaN or +Inf, or all −Inf (``refuse(row, position)`` raises; a −Inf value is a token the
        teachers rule out); count the ensemble's statistics at the masked positions."""
        meta = self.meta
        log_z = torch.logsumexp(ell, dim=-1)
        bad = ~torch.isfinite(log_z)
        if bool(bad.any()):
            refuse(*(int(v) for v in bad.nonzero()[0]))
        u = None if self.draws is None else self.draws[rows, pos]
        self._put(self.form.encode(ell, meta, u, log_z), (rows, pos))
        self._count(ell, log_z, y.long()[..., None], mask.bool())

    def add_at(self, rows: np.ndarray, pos: np.ndarray, ell: torch.Tensor, y: torch.Tensor,
               refuse: Callable[[int, int], None]) -> None:
        """Encode the combined values ``ell`` [b, V] of one position per row (row ``rows[j]``, position
        ``pos[j]``), all carrying a loss, whose labels are ``y`` [b] (a decoding step)."""
        log_z = torch.logsumexp(ell, dim=-1)
        bad = ~torch.isfinite(log_z)
        if bool(bad.any()):
            j = int(bad.nonzero()[0][0])
            refuse(int(rows[j]), int(pos[j]))
        u = None if self.draws is None else self.draws[rows, pos][:, None]
        parts = self.form.encode(ell[:, None], self.meta, u, log_z[:, None])
        self._put({k: v[:, 0] for k, v in parts.items()}, (rows, pos))
        self._count(ell[:, None], log_z[:, None], y.long()[:, None, None], torch.ones_like(y, dtype=torch.bool)[:, None])

    def fill_blank(self, vocab: int, device: torch.device) -> None:
        """Every position's arrays set to the encoding of uniform values (where no targets are computed: the
        prompt and padding of a written response; they carry no loss)."""
        ell = torch.zeros(1, 1, vocab, device=device)
        u = None if self.draws is None else self.draws[:1, :1]
        parts = self.form.encode(ell, self.meta, u, torch.logsumexp(ell, dim=-1))
        for name, t in self._host(parts).items():
            self.parts[name] = np.ascontiguousarray(np.broadcast_to(t, (self.rows, self.length, *t.shape[2:])))

    def _host(self, parts: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = {}
        for name, t in parts.items():
            if BY_NAME[name].log_space and t.is_floating_point() and self.meta.dtype == "float16":
                t = t.clamp_min(FLOAT16_FLOOR).half()
            out[name] = t.cpu().numpy()
        return out

    def _put(self, parts: dict[str, torch.Tensor], at: tuple) -> None:
        """Store encoded ``parts`` at index ``at`` of the chunk's [rows, positions, …] arrays."""
        for name, host in self._host(parts).items():
            arr = self.parts.get(name)
            if arr is None:
                extra = host.shape[2:] if isinstance(at[0], slice) else host.shape[1:]
                arr = self.parts[name] = np.empty((self.rows, self.length, *extra), dtype=host.dtype)
            arr[at] = host

    def _count(self, ell: torch.Tensor, log_z: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> None:
        """The ensemble's top-1 hits and summed NLL of the labels ``y`` [b, s, 1] at the kept positions, of its
        stored distribution at its generation temperature: a hit where the label's value is the largest, and
        the NLL a log-sum-exp less a gather (no argmax or whole log-softmax passes)."""
        t = self.meta.temperature
        at = ell.gather(-1, y)[..., 0]
        self.stats[0] += int(keep.sum())
        self.stats[1] += int(((at >= ell.amax(-1)) & keep).sum())
        lse = log_z if t == 1 else torch.logsumexp(ell / t, -1)
        self.nll[0] += float((lse - at / t)[keep].double().sum())

    def count_teachers(self, z: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> None:
        """Each member's own top-1 hits and summed NLL at T = 1 from its logits ``z`` [M, b, s, V] at some
        positions, their labels ``y`` [b, s] and mask ``keep`` [b, s]."""
        y, keep = y.long()[..., None], keep.bool()
        self.teacher_positions += int(keep.sum())
        for j, zm in enumerate(z):
            at = zm.gather(-1, y)[..., 0]
            self.stats[2 + j] += int(((at >= zm.amax(-1)) & keep).sum())
            self.nll[1 + j] += float((torch.logsumexp(zm, -1) - at)[keep].double().sum())
