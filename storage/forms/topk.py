"""Top-k targets: the K largest ensemble values, their classes, and the log-sum-exp of the rest.

At T = 1 the head's probabilities and the tail's total mass are exact; how the tail's mass is shared among
its classes is lost, so at other temperatures it is taken as spread evenly over them (an approximation)."""

from __future__ import annotations

import math

import numpy as np

from darkstore.errors import SpecError

from ..fieldspec import FieldSpec, index_dtype
from .base import Form


def _topk(m) -> bool:
    return m.target_form == "topk"


def _value_dtype(m) -> str:
    return "uint8" if m.targets.quantised else m.dtype


#: below this share of the total, the tail's mass is summed term by term rather than by subtraction
EXACT_TAIL = 1e-2


def tail_lse(ell, head, idx, log_z=None):
    """log Σ exp(ℓ) over the values left out of the head. With the whole row's log-sum-exp ``log_z`` (computed
    anyway for statistics), ``log_z + log(1 − e^(lse(head) − log_z))`` costs no pass over the row; it is
    accurate to about 2e-7 / (the tail's share) nats, so where the tail holds less than :data:`EXACT_TAIL` of the
    mass those rows are summed exactly, with the head masked out."""
    import torch

    if log_z is None:
        return torch.logsumexp(ell.scatter(-1, idx, float("-inf")), dim=-1)
    share = -torch.expm1(torch.logsumexp(head, dim=-1).double() - log_z.double())  # the tail's share of the mass
    tail = log_z.double() + torch.log(share.clamp_min(1e-300))
    small = share < EXACT_TAIL
    if bool(small.any()):
        rows = ell[small].scatter(-1, idx[small], float("-inf"))
        tail[small] = torch.logsumexp(rows, dim=-1).double()
    return tail


def top_k(x, k: int):
    """The ``k`` largest values along the last axis and their positions (unordered), exactly as ``x.topk(k)``
    gives them up to the order of ties, in two rounds over fewer elements where the axis is long.

    The axis is cut into ``b`` interleaved blocks (block c holds positions c, c + n, c + 2n, … with n = V // b;
    positions from b·n on are always candidates). Each of the k largest values lies in one of the k blocks
    with the largest maxima or among those last positions: otherwise k block maxima, k distinct elements,
    would each be at least as large. So one cheap maximum over the blocks, a top-k of the n maxima and a top-k
    of the k·b candidates replace a top-k over all V; b ≈ √(V / k) keeps both small (about 2√(V·k) elements
    instead of V: a quarter at V = 2,048 and k = 32)."""
    import torch

    v = x.shape[-1]
    b = 1 << max(0, int(math.log2(math.sqrt(v / k)))) if k < v else 1
    if b < 4:
        return x.topk(k, dim=-1, sorted=False)
    n = v // b
    flat = x.reshape(-1, v)
    top_blocks = flat[:, :n * b].unflatten(-1, (b, n)).amax(1).topk(k, dim=-1, sorted=False).indices
    idx = (top_blocks[:, None, :] + n * torch.arange(b, device=x.device)[:, None]).flatten(1)
    if n * b < v:
        idx = torch.cat([idx, torch.arange(n * b, v, device=x.device).expand(len(flat), -1)], dim=1)
    values, j = flat.gather(1, idx).topk(k, dim=-1, sorted=False)
    return values.view(*x.shape[:-1], k), idx.gather(1, j).view(*x.shape[:-1], k)


class TopK(Form):
    name = "topk"
    logp_source = "the stored top-k (exact where the next token was kept, else the tail spread evenly)"
    fields = (
        FieldSpec("topk_logits", ("row", "k"), lambda m: (m.num_rows, m.targets.k), _value_dtype, np.nan,
                  _topk, target=True, log_space=True, per_position=True,
                  doc="top-k targets: the k largest ensemble values (centred log space), or with a step their "
                      "uint8 counts of step nats below the largest", when="topk:K targets"),
        FieldSpec("topk_index", ("row", "k"), lambda m: (m.num_rows, m.targets.k), index_dtype, 0,
                  _topk, per_position=True, sorted_ids=True,
                  doc="top-k targets: their classes, largest value first; in a sequence store their tokens in "
                      "ascending order (uint16 up to 65,536 tokens), delta-encoded", when="topk:K targets"),
        FieldSpec("tail_lse", ("row",), lambda m: (m.num_rows,), lambda m: "float32", np.nan, _topk, target=True,
                  per_position=True,
                  doc="top-k targets: log-sum-exp of the values left out (the tail's mass at T = 1)",
                  when="topk:K targets"),
    )

    def check_job(self, targets, *, combine, temperature, keep_members, num_classes):
        super().check_job(targets, combine=combine, temperature=temperature, keep_members=keep_members,
                          num_classes=num_classes)
        if combine == "arithmetic" and temperature != 1.0:
            raise ValueError(f"top-k of an arithmetic mean is exact only at the temperature it keeps its tail at, "
                             f"T=1, and this job mixes at T={temperature:g}; use temperature 1, or "
                             f"sampled:{targets.k}@{temperature:g}, or dense targets")

    def check_from_engine(self, targets):
        """An engine's top-K log-probabilities are these targets (the same K at most)."""

    def check_size(self, targets, num_classes, unit):
        if targets.k >= num_classes:
            raise SpecError(f"targets topk:{targets.k} keeps every one of the {num_classes} {unit}: ask for dense "
                            "targets")

    def for_tokens(self, targets):
        """Values quantised to 1/16 nat unless the job says otherwise (see ``TargetsRecord.step``)."""
        return targets.model_copy(update={"step": 1 / 16}) if targets.step is None else targets

    def target_bytes(self, meta) -> int:
        value = np.dtype(_value_dtype(meta)).itemsize
        return (value + np.dtype(index_dtype(meta)).itemsize) * meta.targets.k + 4

    def encode(self, ell, meta, uniforms=None, log_z=None):
        """The k largest values, their classes and the tail's log-sum-exp; in a sequence store the kept tokens
        in ascending order (their gaps compress), and with a step the values as uint8 steps below the largest."""

        seq = meta.kind.ascending_ids
        head, idx = top_k(ell, meta.targets.k) if seq else ell.topk(meta.targets.k, dim=-1)
        return self.encode_kept(head, idx, tail_lse(ell, head, idx, log_z), meta)

    def encode_kept(self, head, idx, tail, meta):
        """The stored fields of K kept values ``head`` [..., K] (log space up to a shift per row) of classes
        ``idx`` and the log-sum-exp of the rest, ``tail`` [...], in the same space: what :meth:`encode` stores
        of a whole row, and what an engine's top-K log-probabilities become."""
        import torch

        hi = head.amax(-1, keepdim=True)  # the row's largest value: stored values are centred on it
        head, tail = head - hi, tail - hi[..., 0]
        if meta.kind.ascending_ids:
            idx, order = idx.sort(dim=-1)
            head = head.gather(-1, order)
        if meta.targets.quantised:
            head = torch.round(-head / meta.targets.step).clamp_(0, 255).to(torch.uint8)
        return {"topk_logits": head.float() if head.is_floating_point() else head, "topk_index": idx.to(torch.int32),
                "tail_lse": tail.float()}

    @staticmethod
    def head(parts, meta):
        """The kept values as floats (centred log space), whatever their stored encoding."""
        head = parts["topk_logits"]
        return head.float() * -meta.targets.step if meta.targets.quantised else head.float()

    def decode(self, parts, meta):
        """The kept classes, their values in nats (a quantised store's steps decoded) and the tail."""
        return {"index": parts["topk_index"].long(), "head": self.head(parts, meta),
                "tail": parts["tail_lse"].float()}

    def top1(self, parts, meta):
        head = self.head(parts, meta)
        return parts["topk_index"].long().gather(-1, head.argmax(-1, keepdim=True)).squeeze(-1)

    def kept(self, parts, y):
        return (parts["topk_index"].long() == y[..., None]).any(-1)

    def teacher_logp(self, parts, meta):
        """The head with the tail spread evenly over the classes left out (its argmax is the true top class)."""
        import torch

        num_classes = meta.num_classes
        head, idx, tail = self.head(parts, meta), parts["topk_index"].long(), parts["tail_lse"].float()
        n_tail = num_classes - idx.shape[-1]
        if n_tail > 0:
            full = (tail - math.log(n_tail))[..., None].expand(*tail.shape, num_classes).clone()
        else:
            full = torch.full((*tail.shape, num_classes), float("-inf"), device=head.device)
        full.scatter_(-1, idx, head)
        return torch.log_softmax(full, dim=-1)

    def top_logprobs(self, parts, meta, k):
        """The kept entries, most likely first, normalised by the head's and the tail's total; the first ``k``
        of them where ``k`` is given (the rest join the tail)."""
        import torch

        if k is not None and not 0 < k <= meta.targets.k:
            raise SpecError(f"--k {k}: this store keeps the top {meta.targets.k}; give 1 to {meta.targets.k}")
        head, idx, tail = self.head(parts, meta).double(), parts["topk_index"].long(), parts["tail_lse"].double()
        log_z = torch.logaddexp(torch.logsumexp(head, dim=-1), tail)
        head, order = (head - log_z[..., None]).sort(dim=-1, descending=True)
        idx = idx.gather(-1, order)
        tail = tail - log_z
        if k is not None and k < head.shape[-1]:
            tail = torch.logaddexp(tail, torch.logsumexp(head[..., k:], dim=-1))
            head, idx = head[..., :k], idx[..., :k]
        return idx, head, tail

    def retemper(self, meta, temperature):
        k, c = meta.targets.k, meta.num_classes
        exact = math.isclose(temperature, 1.0)
        head = ("the head is re-tempered exactly" if meta.combine == "geometric" else
                "the head is a sharpened or flattened arithmetic mean (mixed at T=1)")
        return exact, (f"top-{k} of {c} classes with the tail's mass: exact at T=1" if exact else
                       f"APPROXIMATE: top-{k} of {c} classes at T={temperature:g}: {head}, the "
                       "tail's mass as if spread evenly over the classes left out")
