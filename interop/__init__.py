"""darkstore's stores in the formats other distillation tools read, and their captures in darkstore.

A format is one module with a :class:`~interop.base.Format` and an entry in :data:`FORMATS`; nothing else names
one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from darkstore.errors import SpecError
from storage import open_store

from .axolotl import Axolotl
from .base import MANIFEST, ExportReport, Format
from .distillkit import DistillKit
from .hf import HuggingFace

FORMATS: dict[str, Format] = {f.name: f for f in (HuggingFace(), Axolotl(), DistillKit())}


def format_named(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise SpecError(f"unknown format {name!r}: choose one of {', '.join(FORMATS)}") from None


def export_store(store: str, fmt: str, out: str | Path, *, k: int | None = None,
                 progress: Callable[[int, int], None] | None = None, rows_per_file: int | None = None
                 ) -> ExportReport:
    """Every committed row of the sequence store ``store`` written as format ``fmt`` into the folder ``out``."""
    return format_named(fmt).export(open_store(store), Path(out), k=k, progress=progress,
                                    rows_per_file=rows_per_file)


__all__ = ["FORMATS", "MANIFEST", "ExportReport", "Format", "export_store", "format_named"]
