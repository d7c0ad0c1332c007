"""The interface every format of another tool implements (see :mod:`interop`), and what an export does for all
of them: check the store, stream its rows, write the shards, the tokenizer and a manifest of what was kept."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

import storage
from darkstore.errors import SpecError
from storage import StoreReader
from student_trainer.lm_train import copy_tokenizer

from .capture import CapturedRow
from .parquet import Shards
from .rows import TokenChunk, check_token_store, token_chunks

#: the manifest beside an export's data: what it holds, where from, and what it could not keep
MANIFEST = "darkstore-export.json"


@dataclass
class ExportReport:
    format: str
    out: str
    rows: int
    positions: int
    k: int
    temperature: float
    files: list[str]
    bytes: int
    not_kept: list[str]
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_per_position(self) -> float:
        return self.bytes / max(self.positions, 1)


class Format:
    """A format of another tool: its name, what it holds and cannot, and how a store's rows become its rows
    (:meth:`export`) and its rows a store's (:meth:`capture`)."""

    name: str = ""
    #: whether darkstore writes the format (export) and reads it (import)
    writes: bool = True
    reads: bool = True
    #: the tool and what reads the files, in words
    title: str = ""
    #: the peer's source this module follows (repository and commit)
    source: str = ""
    #: what the format cannot hold of a darkstore store, in words (said at export and in the docs)
    not_kept: tuple[str, ...] = ()
    #: column: what it holds
    columns: dict[str, str] = {}

    def schema(self, k: int, vocab: int) -> pa.Schema:
        raise NotImplementedError

    def table(self, chunk: TokenChunk, k: int, vocab: int) -> pa.Table:
        """One chunk's rows as the format's columns."""
        raise NotImplementedError

    def extra_files(self, out: Path, reader: StoreReader, k: int) -> None:
        """Files the format's readers need beside the data (a configuration)."""

    def capture(self, src: Path, k: int | None, tokenizer: str | Path | None = None
                ) -> tuple[list[Path], Callable[[], Iterator[CapturedRow]]]:
        """The capture at ``src``: its files and a function that reads its rows from the start each time it is
        called (an import reads them twice: to check, then to write). ``k``: the K to keep where the capture
        does not say; ``tokenizer``: for a capture that holds text to tokenize."""
        raise SpecError(f"darkstore does not import {self.title}")

    def export(self, reader: StoreReader, out: Path, *, k: int | None = None,
               progress: Callable[[int, int], None] | None = None, rows_per_file: int | None = None
               ) -> ExportReport:
        """Every committed row of ``reader`` into ``out`` (a new or empty folder), a chunk at a time;
        ``progress(rows_done, rows)`` after each chunk. Written beside ``out`` and moved there whole at the end:
        an export that stops leaves nothing at ``out``."""
        if not self.writes:
            raise SpecError(f"darkstore reads {self.title} (darkstore targets import) but does not write it")
        k = check_token_store(reader, f"{self.title}", k)
        _check_out(out)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            report = self._write(reader, work, k, progress, rows_per_file, out)
            if out.exists():
                out.rmdir()
            work.rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return report

    def _write(self, reader, out, k, progress, rows_per_file, final) -> ExportReport:
        vocab = reader.meta.num_classes
        shards = Shards(out, self.schema(k, vocab), **({"rows_per_file": rows_per_file} if rows_per_file else {}))
        rows = positions = 0
        total = reader.rows_done
        for chunk in token_chunks(reader, k):
            shards.write(self.table(chunk, k, vocab))
            rows, positions = rows + len(chunk.rows), positions + chunk.positions
            if progress is not None:
                progress(rows, total)
        files = shards.close()
        self.extra_files(out, reader, k)
        _tokenizer(out / "tokenizer", reader.meta.sequence)
        report = ExportReport(self.name, str(final), rows, positions, k, reader.meta.temperature,
                              [str(f.relative_to(out)) for f in files], sum(f.stat().st_size for f in files),
                              list(self.not_kept), dict(self.columns))
        _manifest(out, reader, report, self)
        return report


def _tokenizer(folder: Path, seq) -> None:
    """The store's tokenizer (with a chat store's template) where ``AutoTokenizer`` loads it, its padding token
    named (the one the store padded rows with), as trainers' collators need one."""
    from tokenizers import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(seq.tokenizer.path, folder, seq.chat)
    pad = seq.tokenizer.pad_id if seq.tokenizer.pad_id is not None else seq.tokenizer.eos_id
    config = folder / "tokenizer_config.json"
    if pad is None or not (folder / "tokenizer.json").is_file():
        return
    raw = json.loads(config.read_text()) if config.is_file() else {}
    if raw.get("pad_token") is None:
        raw["pad_token"] = Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(pad)
        config.write_text(json.dumps(raw, indent=2) + "\n")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"{out} exists and is not an empty folder: export into a new one")
    out.parent.mkdir(parents=True, exist_ok=True)


def _manifest(out: Path, reader: StoreReader, report: ExportReport, fmt: Format) -> None:
    meta = reader.meta
    tok = meta.sequence.tokenizer
    doc: dict[str, Any] = {
        **asdict(report), "source": fmt.source, "darkstore": storage.__version__,
        "store": {"path": reader.path, "job_key": meta.job_key, "targets": str(meta.targets) if meta.targets else meta.target_form,
                  "combine": meta.combine, "teachers": [t.name for t in meta.teachers],
                  "temperature": meta.temperature, "length": meta.sequence.length},
        "tokenizer": {"folder": "tokenizer", "path": tok.path, "fingerprint": tok.fingerprint,
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "alignment": "position t's targets are the teachers' distribution over the token after input t "
                     "(compare with a causal model's logits at t)",
    }
    (out / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
