"""Row kinds on the storage side: what a store's rows are, one module per kind.

A kind declares, in one place, what differs between kinds of rows: its own fields (a class store's
``labels``; a token store's ``tokens``, ``loss_mask`` and per-chunk NLL), the position axis its per-position
target fields gain, the dtype of its stored ids and their codecs, its bytes per row, what ``inspect`` and the
reader's checks and statistics say of it. A store records its kind once, by its record (``meta.sequence``
for tokens); :func:`kind_of` (``meta.kind``) is the only lookup. The kinds of the other layers are
:mod:`teacher_service.kinds` (how a teacher batch is made) and :mod:`student_trainer.kinds` (a student's
inputs, recipe, evaluation and report), registered under the same names. Adding a kind: a module here with
its record on :class:`~storage.schema.StoreMeta`, one beside each of those, and an entry in each registry.
"""

from __future__ import annotations

from .base import Kind
from .classes import Classes
from .tokens import Tokens

#: every row kind, by name (the order of their fields in a store)
KINDS: dict[str, Kind] = {k.name: k for k in (Classes(), Tokens())}


def kind_of(meta) -> Kind:
    """The kind of ``meta``'s rows."""
    return next(k for k in KINDS.values() if k.recognises(meta))


def kind_for_data(data_kind: str) -> Kind:
    """The kind of the rows a transfer set of ``data_kind`` makes (a job's ``data.kind``): the kind that lists
    it, else rows of classes (arrays, images, datasets)."""
    return next((k for k in KINDS.values() if data_kind in k.data_kinds), KINDS[Classes.name])


__all__ = ["KINDS", "Classes", "Kind", "Tokens", "kind_for_data", "kind_of"]
