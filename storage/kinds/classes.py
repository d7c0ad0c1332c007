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

    def describe(self, s, human):
        if s["targets_record"] is None:  # every class's value
            return [("logits", f"[{s['rows']}, {s['classes']}] {s['dtype']}, chunks of {s['chunk_rows']} rows, "
                               f"{s['compressor']}")]
        return [("targets", f"{s['targets']} of {s['classes']} classes per row, {s['dtype']}, chunks of "
                            f"{s['chunk_rows']} rows, {s['compressor']}")]

    def size_line(self, s, human):
        return (f"{human(s['disk_bytes'])} ({s['bytes_per_sample']:.1f} B/sample, {s['bytes_per_row']:.1f} B/row; "
                f"uncompressed {s['raw_bytes_per_sample']} B/sample, {s['raw_bytes_per_row']} B/row)")

    def ensemble_line(self, s):
        acc = s["accuracy"]
        if not acc:
            return None
        return "ensemble accuracy", f"{100 * acc['ensemble']:.2f} % on {acc['labeled_rows']} labeled rows"

    def teacher_line(self, s, name):
        acc = s["accuracy"] or {}
        return f", accuracy {100 * acc[name]:.2f} %" if name in acc else ""

    def own_bytes(self, meta) -> int:
        members = meta.num_members if meta.keep_members else 0
        return meta.item_bytes * (meta.num_classes * members + meta.feature_size) + 16 + 8 * meta.num_view_params
