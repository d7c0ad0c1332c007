"""Rows of classes: one sample (or one recorded view of it) per row, its hard label beside its targets."""

from __future__ import annotations


from ..fieldspec import FieldSpec
from .base import Kind


def _classes(m) -> bool:
    return m.kind.name == Classes.name


class Classes(Kind):
    name = "classes"
    row_fields = (
        FieldSpec("labels", ("row",), lambda m: (m.num_rows,), lambda m: "int64", -1, _classes,
                  doc="hard labels, -1 where unlabeled", when="classes"),
    )

    def recognises(self, meta) -> bool:
        return meta.sequence is None

    def own_bytes(self, meta) -> int:
        members = meta.num_members if meta.keep_members else 0
        return meta.item_bytes * (meta.num_classes * members + meta.feature_size) + 16 + 8 * meta.num_view_params
