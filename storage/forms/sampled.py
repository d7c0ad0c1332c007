"""Sampled targets: K classes per row (per position) drawn with replacement from ``softmax(ℓ / T)``.

The draws invert each row's CDF at uniforms from a generator seeded by (``seed``, chunk), so the same chunk of
the same job draws the same classes, whichever worker writes it (on the same kind of device). Sorted per row;
duplicates kept (a class drawn twice counts twice). An unbiased estimate at the temperature drawn at only."""

from __future__ import annotations

import math

import numpy as np

from darkstore.errors import SpecError

from ..fieldspec import FieldSpec, index_dtype
from .base import Form


class Sampled(Form):
    name = "sampled"
    fields = (
        FieldSpec("sample_index", ("row", "k"), lambda m: (m.num_rows, m.targets.k), index_dtype, 0,
                  lambda m: m.target_form == "sampled", per_position=True, sorted_ids=True,
                  doc="sampled targets: k classes (tokens) drawn per row, sorted", when="sampled:K targets"),
    )

    def check_job(self, targets, *, combine, temperature, keep_members, num_classes):
        super().check_job(targets, combine=combine, temperature=temperature, keep_members=keep_members,
                          num_classes=num_classes)
        if combine == "arithmetic" and targets.temperature != temperature:
            raise ValueError(f"sampled targets of an arithmetic mean must be drawn at its temperature: the job mixes "
                             f"at T={temperature:g} and samples at T={targets.temperature:g}; write "
                             f"sampled:{targets.k}@{temperature:g}")

    def drawn_at(self, targets):
        return float(targets.temperature)

    def target_bytes(self, meta) -> int:
        return np.dtype(index_dtype(meta)).itemsize * meta.targets.k

    def draws(self, meta, chunk, shape):
        """Uniforms [*shape, k] for chunk ``chunk`` (``shape``: its rows, and positions in a sequence store)."""
        return np.random.default_rng([meta.targets.seed, chunk]).random((*shape, meta.targets.k))

    def encode(self, ell, meta, uniforms=None, log_z=None):
        import torch

        c = ell.shape[-1]
        p = torch.softmax(ell.double() / meta.targets.temperature, dim=-1)
        cdf = torch.cumsum(p, dim=-1)
        cdf /= cdf[..., -1:].clone()  # exactly 1 at the end, whatever the rounding of the sum
        u = torch.as_tensor(uniforms, dtype=torch.float64, device=ell.device)
        idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp_max(c - 1)
        return {"sample_index": idx.sort(dim=-1).values.to(torch.int32)}

    def decode(self, parts, meta):
        return {"index": parts["sample_index"].long()}

    def top1(self, parts, meta):
        """The most drawn class."""
        idx = parts["sample_index"].long()
        counts = (idx[..., :, None] == idx[..., None, :]).sum(-1)
        return idx.gather(-1, counts.argmax(-1, keepdim=True)).squeeze(-1)

    def teacher_logp(self, parts, meta):
        """Sample frequencies, smoothed so that an unsampled class is unlikely rather than impossible."""
        import torch

        num_classes = meta.num_classes
        idx = parts["sample_index"].long()
        counts = torch.zeros(*idx.shape[:-1], num_classes, device=idx.device).scatter_add_(
            -1, idx, torch.ones(idx.shape, device=idx.device))
        return torch.log((counts + 0.5 / num_classes) / (idx.shape[-1] + 0.5))

    def retemper(self, meta, temperature):
        ts, k = meta.targets.temperature, meta.targets.k
        if not math.isclose(temperature, ts, rel_tol=1e-9):
            raise SpecError(f"this store's targets are {k} classes sampled at T={ts:g}: an unbiased "
                            f"estimate at that temperature only; train with --temperature {ts:g}, or generate "
                            f"sampled:{k}@{temperature:g}")
        return True, f"{k} samples per row drawn at T={ts:g}: an unbiased estimate of the soft term"
