"""Target forms: how a store holds its teachers' distribution, one module per form.

A form declares, in one place, everything that differs between forms:

- its row fields (:attr:`Form.fields`, which :data:`storage.fields.FIELDS` includes);
- its uncompressed bytes per row or per position (:meth:`Form.target_bytes`);
- how generation encodes the combined ensemble values into those fields (:meth:`Form.encode`, torch, on the
  generating device, over any leading shape: ``[rows, C]`` for classes, ``[rows, positions, C]`` for tokens);
- how stored fields decode into log-probabilities at T = 1 for metrics (:meth:`Form.teacher_logp`);
- what re-temperature means for it (:meth:`Form.retemper`: exact or not, in words, or refused).

The form of a store is ``meta.target_form``; :func:`form_of` is the only lookup. Adding a form is a module
here and an entry in :data:`FORMS`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from .base import Form
from .dense import Dense
from .sampled import Sampled
from .topk import TopK

#: every form, by the name a job asks for (``targets: dense | topk:K | sampled:K``)
FORMS: dict[str, Form] = {f.name: f for f in (Dense(), TopK(), Sampled())}


def form_of(meta) -> Form:
    """The form of ``meta``'s targets."""
    return FORMS[meta.target_form]


class TargetsRecord(BaseModel):
    """The form a store's teacher targets take; a job asks for it as ``dense``, ``topk:K`` or ``sampled:K``
    (``sampled:K@T`` to sample at temperature T).

    - ``dense``: ``logits`` [N, C], every class (re-temperature exact for the geometric mean).
    - ``topk``: the K largest ensemble values per row (``topk_logits``, row-centred log space, and their
      classes ``topk_index``) and ``tail_lse``, the log-sum-exp of the C − K values left out: at T = 1 the
      head's probabilities and the tail's total mass are exact; at other T the tail is approximated.
    - ``sampled``: ``sample_index``, K classes per row drawn with replacement from ``softmax(logits / T)``
      with a generator seeded by (``seed``, chunk), so the same job writes the same samples on the same
      kind of device. The estimate is unbiased at that T only: other temperatures are refused."""

    model_config = ConfigDict(extra="forbid")
    form: Literal["dense", "topk", "sampled"] = "dense"
    k: int | None = Field(None, ge=1, description="entries kept per row (topk, sampled)")
    temperature: float | None = Field(None, gt=0, le=100, description="sampled: the temperature drawn at")
    seed: int | None = Field(None, description="sampled: the generator's seed")
    step: float | None = Field(None, ge=0, le=1, description="topk: each kept value stored as a uint8 count of "
                               "step nats below its row's (position's) largest, so off by at most step/2, and "
                               "clipped 255 steps down; 0: values in the store's dtype. Default: 1/16 in a "
                               "sequence store, 0 otherwise")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        d = handler(self)
        if d.get("step") is None:  # unset: the dumps (and job keys) of stores made before it existed stay
            d.pop("step", None)
        return d

    @property
    def quantised(self) -> bool:
        return bool(self.step)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        form, _, rest = v.strip().partition(":")
        if form == "dense" and not rest:
            return {"form": "dense"}
        k, _, t = rest.partition("@")
        if form not in ("topk", "sampled") or not k.strip().isdigit() or (t and form != "sampled"):
            raise ValueError(f"targets {v!r}: write dense, topk:K or sampled:K (sampled:K@T to sample at T)")
        out: dict[str, Any] = {"form": form, "k": int(k)}
        if form == "sampled":
            out.update(temperature=float(t) if t else 1.0, seed=0)
        return out

    @model_validator(mode="after")
    def _check(self) -> "TargetsRecord":
        if (self.form == "dense") != (self.k is None):
            raise ValueError("dense targets take no k; topk and sampled need one")
        if self.form == "sampled" and self.temperature is None:
            self.temperature = 1.0
        if self.form == "sampled" and self.seed is None:
            self.seed = 0
        if self.form != "sampled" and (self.temperature is not None or self.seed is not None):
            raise ValueError("only sampled targets take a temperature and a seed")
        if self.form != "topk" and self.step:
            raise ValueError("only topk targets take a step (their values' quantisation)")
        return self

    @property
    def spec(self) -> Form:
        """The form these targets take (:data:`FORMS`)."""
        return FORMS[self.form]

    def __str__(self) -> str:
        if self.form == "dense":
            return "dense"
        return f"{self.form}:{self.k}" + (f"@{self.temperature:g}" if self.form == "sampled" else "")


__all__ = ["FORMS", "Dense", "Form", "Sampled", "TargetsRecord", "TopK", "form_of"]
