"""darkstore's stores in the formats other distillation tools read, and their captures in darkstore.

A format is one module with a :class:`~interop.base.Format` and an entry in :data:`FORMATS`; nothing else names
one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from darkstore.errors import DataNotFoundError, SpecError
from storage import open_store

from .axolotl import Axolotl
from .base import MANIFEST, ExportReport, Format
from .capture import ImportReport, import_rows
from .distillkit import DistillKit
from .hf import HuggingFace
from .vllm import Vllm

FORMATS: dict[str, Format] = {f.name: f for f in (HuggingFace(), Axolotl(), DistillKit(), Vllm())}


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


def import_capture(fmt: str, src: str | Path, out: str | Path, tokenizer: str | Path, *, k: int | None = None,
                   name: str | None = None, temperature: float = 1.0, step: float = 0.0,
                   chunk_rows: int | None = None, length: int | None = None, overwrite: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """The capture ``src`` (format ``fmt``) as a darkstore store at ``out``, its ids checked against
    ``tokenizer``; ``temperature``: the one it was captured at; ``step``: quantise the kept values to uint8
    steps of that many nats (0: float32)."""
    f = format_named(fmt)
    src = Path(src)
    if not src.exists():
        raise DataNotFoundError(f"{src} does not exist")
    files, rows = f.capture(src, k, tokenizer)
    return import_rows(f.name, src, files, rows, out, tokenizer, name=name, temperature=temperature, step=step,
                       chunk_rows=chunk_rows, length=length, overwrite=overwrite, progress=progress)


__all__ = ["FORMATS", "MANIFEST", "ExportReport", "Format", "ImportReport", "export_store", "format_named",
           "import_capture"]
