"""Reading a text corpus's files and records: UTF-8 text files, JSON-lines files and Hugging Face datasets saved
to disk, each record with where it came from (for one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, DataNotFoundError, SpecError


def read_text(p: Path) -> str:
    """A UTF-8 text file's text; a binary or otherwise encoded file is refused in one line."""
    data = p.read_bytes()
    if b"\0" in data:
        raise DataError(f"{p} is not text (it holds NUL bytes): a text corpus takes UTF-8 text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start}): a text corpus takes UTF-8 "
                        "text files") from None


def raw_records(fmt: str, root: Path, split: str | None = None) -> Iterator[tuple[Any, str]]:
    """(record, where) of a JSON-lines file (``fmt`` jsonl) or a saved dataset (huggingface), in order."""
    if fmt == "jsonl":
        yield from _jsonl(root)
    else:
        yield from _huggingface(root, split)


def _jsonl(root: Path) -> Iterator[tuple[Any, str]]:
    for n, line in enumerate(read_text(root).splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{root} line {n} is not JSON: {exc}") from None
        yield raw, f"{root} line {n}"


def _huggingface(root: Path, split: str | None) -> Iterator[tuple[Any, str]]:
    try:
        import datasets
    except ImportError as exc:
        raise SpecError("format huggingface needs the datasets package: pip install 'darkstore[hf]'") from exc
    try:
        ds = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError) as exc:
        raise DataNotFoundError(f"{root} is not a dataset saved with save_to_disk: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise SpecError(f"{root} holds splits {', '.join(ds)}: name one with split:")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield row, f"{root} row {i}"
