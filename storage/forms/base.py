"""The interface every target form implements (see :mod:`storage.forms`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..fieldspec import FieldSpec
from ..schema import StoreMeta

if TYPE_CHECKING:
    import torch


def _target_shape(meta: StoreMeta, *tail: int) -> tuple[int, ...]:
    return (meta.num_rows, *tail)


class Form:
    name: str = ""
    fields: tuple[FieldSpec, ...] = ()

    def target_bytes(self, meta: StoreMeta) -> int:
        """Uncompressed bytes of one row's targets (one position's, in a sequence store)."""
        raise NotImplementedError

    def encode(self, ell: "torch.Tensor", meta: StoreMeta, uniforms: "torch.Tensor | None" = None,
               log_z: "torch.Tensor | None" = None) -> dict[str, "torch.Tensor"]:
        """The stored fields of the combined values ``ell`` [..., C] (float32; log space up to a shift per row:
        what is stored is centred on each row's largest value), on ell's device. ``uniforms`` [..., k]: the
        draws of a sampled form (:meth:`draws`); ``log_z`` [...]: ``logsumexp(ell)`` where the caller has it."""
        raise NotImplementedError

    def draws(self, meta: StoreMeta, chunk: int, shape: tuple[int, ...]) -> Any:
        """Random numbers a chunk's encoding consumes (None for a deterministic form)."""
        return None

    def teacher_logp(self, parts: dict[str, "torch.Tensor"], meta: StoreMeta) -> "torch.Tensor":
        """[..., C] the teachers' log-probabilities at T = 1 as far as the stored fields tell (metrics)."""
        raise NotImplementedError

    def retemper(self, meta: StoreMeta, temperature: float) -> tuple[bool, str] | None:
        """Whether training at ``temperature`` reads these targets exactly and what it gets, in words; None
        where the combine rule decides (dense targets). Raises SpecError where the form cannot give T."""
        return None
