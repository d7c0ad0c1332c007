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

from .base import Form
from .dense import Dense
from .sampled import Sampled
from .topk import TopK

#: every form, by the name a job asks for (``targets: dense | topk:K | sampled:K``)
FORMS: dict[str, Form] = {f.name: f for f in (Dense(), TopK(), Sampled())}


def form_of(meta) -> Form:
    """The form of ``meta``'s targets."""
    return FORMS[meta.target_form]


__all__ = ["FORMS", "Form", "form_of"]
