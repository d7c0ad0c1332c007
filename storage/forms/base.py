"""The interface every target form implements (see :mod:`storage.forms`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from darkstore.errors import SpecError

from ..fieldspec import FieldSpec
if TYPE_CHECKING:
    import torch

    from ..schema import StoreMeta


def _target_shape(meta: StoreMeta, *tail: int) -> tuple[int, ...]:
    return (meta.num_rows, *tail)


class Form:
    name: str = ""
    fields: tuple[FieldSpec, ...] = ()
    #: what the teachers' log-probabilities from the stored fields are, in words (None: the fields only
    #: estimate them, and no teacher perplexity is read from them)
    logp_source: str | None = None
    #: whether the form keeps every class's value (then a job's record of it is the default, and members,
    #: logit matching and specialists' planning can read it)
    every_class: bool = False

    def check_job(self, targets: Any, *, combine: str, temperature: float, keep_members: bool,
                  num_classes: int | None) -> None:
        """Refuse (ValueError, one line) a job that asks for these targets with options they cannot serve."""
        if keep_members and not self.every_class:
            raise ValueError(f"keep_members stores every member's {num_classes or 'C'} logits per row densely, "
                             f"more than {targets} targets save; keep members in a dense store")

    def check_from_engine(self, targets: Any) -> None:
        """Refuse (SpecError, one line) these targets where an inference engine's top-K log-probabilities per
        position are all there is to make them from."""
        raise SpecError(f"engine teachers return each position's top-K log-probabilities, not the whole "
                        f"distribution: targets {self.name} cannot be made from them; ask for topk:K")

    def check_size(self, targets: Any, num_classes: int, unit: str) -> None:
        """Refuse (SpecError) targets that would not save anything over ``num_classes`` classes (tokens)."""

    def for_tokens(self, targets: Any) -> Any:
        """The targets record with the defaults of a store of token sequences."""
        return targets

    def drawn_at(self, targets: Any) -> float | None:
        """The one temperature the stored targets estimate the teachers at (None: any temperature reads them)."""
        return None

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

    def decode(self, parts: dict[str, "torch.Tensor"], meta: StoreMeta) -> dict[str, "torch.Tensor"]:
        """The stored fields ``parts`` (by field name, any leading shape) as a loss reads them, whatever their
        stored encoding: ``logits`` (dense; with ``members`` where given), or ``index`` with ``head`` values in
        nats (centred log space) and the ``tail``'s log-sum-exp (top-k), or ``index`` alone (sampled)."""
        raise NotImplementedError

    def teacher_logp(self, parts: dict[str, "torch.Tensor"], meta: StoreMeta) -> "torch.Tensor":
        """[..., C] the teachers' log-probabilities at T = 1 as far as the stored fields tell (metrics)."""
        raise NotImplementedError

    def top1(self, parts: dict[str, "torch.Tensor"], meta: StoreMeta) -> "torch.Tensor":
        """[...] the teachers' most likely class (token) as far as the stored fields tell."""
        return self.teacher_logp(parts, meta).argmax(-1)

    def kept(self, parts: dict[str, "torch.Tensor"], y: "torch.Tensor") -> "torch.Tensor | None":
        """[...] whether class ``y`` is among the entries the form kept (None: the form keeps every class or
        says nothing of it)."""
        return None

    def top_logprobs(self, parts: dict[str, "torch.Tensor"], meta: StoreMeta, k: int | None
                     ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """What the top-K formats of other tools hold: at each position the ``k`` most likely classes (tokens),
        most likely first ([..., k] int64), their normalised log-probabilities at the store's temperature
        ([..., k] float64) and the log of the mass left out ([...]; -inf where nothing is). ``k`` None: the
        form's own K. Raises SpecError where the form does not keep a top K."""
        raise SpecError(f"targets {self.name} keep no top-K log-probabilities: they cannot be written as a top-K "
                        "format (export a store with topk:K or dense targets)")

    def retemper(self, meta: StoreMeta, temperature: float) -> tuple[bool, str] | None:
        """Whether training at ``temperature`` reads these targets exactly and what it gets, in words; None
        where the combine rule decides (dense targets). Raises SpecError where the form cannot give T."""
        return None
