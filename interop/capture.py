"""Captures made by other tools written into a darkstore store: the rows a format's reader yields, checked
against the tokenizer, their tails computed where the capture has none, and stored as an engine's top-K
log-probabilities are (``meta.engine``: normalised log-probabilities, not logits). Resumable: the same import
into the same folder writes only the chunks not yet committed."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import darkstore
from darkstore.errors import DataError, SpecError
from darkstore.lm import TokenizerMismatchError
from darkstore.text import LoadedTokenizer, load_tokenizer
from storage import StoreMeta, StoreWriter, TeacherRecord, TransferSetRecord, open_store
from storage.forms import TargetsRecord, TopK, form_of
from storage.schema import EngineMemberRecord, EngineRecord, SequenceRecord, TokenizerRecord
from teacher_service.engines.capture import tail_floor, tail_mass

#: rows whose decoded text is re-encoded to check the tokenizer against the capture's ids
TOKENIZER_PROBE_ROWS = 16


@dataclass
class CapturedRow:
    """One row of a capture: ``tokens`` (n + 1 ids), at each of its n positions the K ``ids`` and their
    normalised log-probabilities ``logp`` (any order), which positions carry a loss (``mask``; None: all), the
    log of the mass left out (``tail``; None: ``log1p(-Σp)``) and the actual next token's log-probability
    where the capture gives it (``label``; None or NaN: from the kept entries, or the tail spread evenly)."""

    tokens: np.ndarray
    ids: np.ndarray
    logp: np.ndarray
    mask: np.ndarray | None = None
    tail: np.ndarray | None = None
    label: np.ndarray | None = None


@dataclass
class Scan:
    rows: int
    length: int
    k: int
    positions: int
    padded: bool


@dataclass
class ImportReport:
    format: str
    store: str
    rows: int
    positions: int
    k: int
    length: int
    written_chunks: int
    floored: int
    #: of the positions written with a loss, the share whose actual next token is among the kept K (a capture
    #: aligned one position off shows far less than the teacher's usual share)
    label_kept: float | None = None


def exported_length(src: Path) -> int | None:
    """The row length of the store a darkstore export at ``src`` came from (its manifest), if it is one."""
    manifest = (src if src.is_dir() else src.parent) / "darkstore-export.json"
    if not manifest.is_file():
        return None
    try:
        return int(json.loads(manifest.read_text())["store"]["length"])
    except (ValueError, KeyError, TypeError):
        return None


def digest(paths: list[Path]) -> str:
    """sha256 over the capture's files (names relative to their folder, sizes and bytes)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def scan(rows: Iterator[CapturedRow], tok: LoadedTokenizer, who: str) -> Scan:
    """One pass over the capture: its row count, longest row, K (the same in every row) and positions with a
    loss; every id checked against the tokenizer's vocabulary and every value against being a log-probability;
    the first rows' text re-encoded by the tokenizer (some must come back as the same ids)."""
    n = length = positions = 0
    k = None
    padded = False
    probes: list[bool] = []
    vocab = tok.vocab_size
    for r, row in enumerate(rows):
        where = f"{who}, row {r}"
        _check_row(row, where, vocab)
        if k is None:
            k = row.ids.shape[1]
        elif row.ids.shape[1] != k:
            raise DataError(f"{where} keeps {row.ids.shape[1]} tokens a position where the rows before it keep {k}: "
                            "every row of a capture must keep the same K")
        if len(probes) < TOKENIZER_PROBE_ROWS:
            ids = row.tokens.tolist()
            probes.append(tok.encode([tok.tokenizer.decode(ids, skip_special_tokens=False)])[0] == ids)
        n, length = n + 1, max(length, len(row.ids))
        positions += int(row.mask.sum()) if row.mask is not None else len(row.ids)
        padded |= row.mask is not None and not row.mask.all()
    if n == 0:
        raise DataError(f"{who} holds no rows")
    if not any(probes):
        raise TokenizerMismatchError(f"{who}: the tokenizer {tok.path} does not give back the capture's token ids "
                                     f"from their own text (none of the first {len(probes)} rows): the capture was "
                                     "made with another tokenizer")
    return Scan(n, length, k, positions, padded)


def _check_row(row: CapturedRow, where: str, vocab: int) -> None:
    n = len(row.tokens) - 1
    if n < 1 or row.ids.ndim != 2 or row.ids.shape != row.logp.shape or len(row.ids) != n:
        raise DataError(f"{where}: {len(row.tokens)} tokens but targets for {len(row.ids)} positions (want one "
                        "fewer than the tokens, each with K ids and K log-probabilities)")
    for name, ids in (("token", row.tokens), ("top-K token", row.ids)):
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            raise TokenizerMismatchError(f"{where}: {name} id {int(ids[bad][0])} is outside the tokenizer's "
                                         f"vocabulary of {vocab:,} (another tokenizer, or a model's padded head)")
    if np.isnan(row.logp).any():
        raise DataError(f"{where}: NaN log-probabilities")
    if (row.logp > 1e-4).any():
        raise DataError(f"{where}: a value above 0 ({row.logp.max():.3g}): these are not normalised "
                        "log-probabilities (logits cannot be imported)")


def import_meta(fmt: str, src: Path, files: list[Path], tok: LoadedTokenizer, s: Scan, *, name: str,
                temperature: float, step: float, chunk_rows: int | None = None) -> StoreMeta:
    """The store's metadata: an engine-like record of the capture (its format, files and digest)."""
    source = digest(files)
    spec = {"kind": "capture", "format": fmt, "path": str(src)}
    job = {"import": {**spec, "tokenizer": tok.path, "temperature": temperature, "step": step, "name": name,
                      "length": s.length, "chunk_rows": chunk_rows}}
    key = hashlib.sha256(json.dumps({"source": source, "tokenizer": tok.fingerprint, **job}, sort_keys=True)
                         .encode()).hexdigest()
    return StoreMeta(
        software_version=darkstore.__version__, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        job_key=key, num_rows=s.rows, num_classes=tok.vocab_size, chunk_rows=chunk_rows or max(1, 65536 // s.length),
        dtype="float32", compressor="zstd", combine="geometric", temperature=temperature, keep_members=False,
        teachers=[TeacherRecord(name=name, arch="capture", format="none", sha256=source, num_params=0, spec=spec)],
        transfer_set=TransferSetRecord(spec=spec, fingerprint=source, num_samples=s.rows), job=job,
        row_order="natural", targets=TargetsRecord(form=TopK.name, k=s.k, step=step),
        sequence=SequenceRecord(length=s.length, packing="records" if s.padded else "packed", positions=s.positions,
                                text_bytes=0, tokenizer=TokenizerRecord(
                                    path=tok.path, fingerprint=tok.fingerprint, vocab_size=tok.vocab_size,
                                    eos_id=tok.eos_id, pad_id=tok.pad_id)),
        engine=EngineRecord(members=[EngineMemberRecord(name=name, engine=f"{fmt} capture", model=name,
                                                        root=str(src))], tail_floor=tail_floor(s.k)),
    )


class ChunkFields:
    """A chunk's rows padded to the store's length and turned into its fields and statistics."""

    def __init__(self, meta: StoreMeta, rows: list[CapturedRow], start: int):
        length, k, v = meta.sequence.length, meta.targets.k, meta.num_classes
        pad = meta.sequence.tokenizer.pad_id
        pad = meta.sequence.tokenizer.eos_id if pad is None else pad
        r = len(rows)
        self.tokens = np.full((r, length + 1), pad or 0, dtype=np.int64)
        self.mask = np.zeros((r, length), dtype=bool)
        ids = np.tile(np.arange(k), (r, length, 1))
        logp = np.full((r, length, k), -math.log(v))
        tail = np.full((r, length), math.log1p(-k / v))
        label = np.full((r, length), np.nan)
        self.floored = self.kept = 0
        floor = tail_floor(k)
        for j, row in enumerate(rows):
            n = len(row.ids)
            self.tokens[j, :n + 1] = row.tokens
            self.mask[j, :n] = True if row.mask is None else row.mask
            order = np.argsort(-row.logp, axis=1, kind="stable")
            ids[j, :n], logp[j, :n] = np.take_along_axis(row.ids, order, 1), np.take_along_axis(row.logp, order, 1)
            if row.tail is None:
                tail[j, :n], f = tail_mass(row.logp, floor)
                self.floored += f
            else:
                tail[j, :n] = np.maximum(row.tail, floor)
            if row.label is not None:
                label[j, :n] = row.label
        self.ids, self.logp, self.tail, self.label = ids, logp, tail, label
        self.index = np.arange(start, start + r)
        self.meta = meta

    def fields(self) -> dict:
        meta, k = self.meta, self.meta.targets.k
        head = np.maximum(self.logp, self.logp[..., :1] - 1e4)  # a kept p = 0: stored 10⁴ nats down
        parts = form_of(meta).encode_kept(torch.from_numpy(head), torch.from_numpy(self.ids),
                                          torch.from_numpy(self.tail), meta)
        y = self.tokens[:, 1:]
        at = self.ids == y[..., None]
        kept = np.take_along_axis(self.logp, at.argmax(-1)[..., None], -1)[..., 0]
        spread = self.tail - math.log(max(meta.num_classes - k, 1))
        label = np.where(np.isnan(self.label), np.where(at.any(-1), kept, spread), self.label)
        keep = self.mask
        self.kept = int((at.any(-1) & keep).sum())
        hit = int(((label >= self.logp[..., 0]) & keep).sum())
        nll = float(-label[keep].sum())
        return {**{name: t.numpy() for name, t in parts.items()}, "tokens": self.tokens, "loss_mask": self.mask,
                "index": self.index, "stats": np.array([keep.sum(), hit, hit]), "nll": np.array([nll, nll]),
                "teacher_positions": int(keep.sum()), "engine_counts": np.array([self.floored, 0]),
                "reference_kl": np.array([np.nan])}


def write_capture(meta: StoreMeta, out: str | Path, rows: Callable[[], Iterator[CapturedRow]], *,
                  overwrite: bool = False, progress: Callable[[int, int], None] | None = None
                  ) -> tuple[int, int, float | None]:
    """The capture's rows into the store at ``out`` (created, or reopened to resume), chunk by chunk: only the
    chunks not yet committed are written. Returns (chunks written, tails floored, the share of the written
    positions with a loss whose next token is among the kept K)."""
    writer = StoreWriter.open_or_create(out, meta, overwrite=overwrite)
    pending = set(writer.pending_chunks())
    written = floored = kept = positions = 0
    batch: list[CapturedRow] = []
    chunk = 0
    for row in rows():
        batch.append(row)
        a, b = writer.bounds(chunk)
        if len(batch) == b - a:
            if chunk in pending:
                f = ChunkFields(meta, batch, a)
                writer.write_chunk(chunk, **f.fields())
                written, floored = written + 1, floored + f.floored
                kept, positions = kept + f.kept, positions + int(f.mask.sum())
            if progress is not None:
                progress(b, meta.num_rows)
            batch, chunk = [], chunk + 1
    return written, floored, kept / positions if positions else None


def plan_import(fmt: str, src: Path, files: list[Path], rows: Callable[[], Iterator[CapturedRow]],
                tokenizer: str | Path, *, name: str | None = None, temperature: float = 1.0, step: float = 0.0,
                chunk_rows: int | None = None, length: int | None = None) -> StoreMeta:
    """The store a capture becomes, after one checking pass over it. Rows are padded to ``length`` positions
    (default: the length of the store a darkstore export was made from, as its manifest says, else the
    longest row)."""
    if temperature <= 0:
        raise SpecError(f"--temperature {temperature:g}: the temperature the capture was made at is positive")
    tok = load_tokenizer(tokenizer)
    s = scan(rows(), tok, f"{fmt} capture {src}")
    length = length or exported_length(src)
    if length is not None and length < s.length:
        raise SpecError(f"--length {length}: the capture has rows of {s.length} positions; give at least that")
    s.length = length or s.length
    return import_meta(fmt, src, files, tok, s, name=name or f"{fmt}-capture", temperature=temperature, step=step,
                       chunk_rows=chunk_rows)


def import_rows(fmt: str, src: Path, files: list[Path], rows: Callable[[], Iterator[CapturedRow]], out: str | Path,
                tokenizer: str | Path, *, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None, **options) -> ImportReport:
    """Scan, check and write a capture (see the module's docstring and :func:`plan_import`); the store is
    verified at the end."""
    meta = plan_import(fmt, src, files, rows, tokenizer, **options)
    written, floored, kept = write_capture(meta, out, rows, overwrite=overwrite, progress=progress)
    reader = open_store(out)
    reader.verify()
    return ImportReport(fmt, reader.path, meta.num_rows, meta.sequence.positions, meta.targets.k,
                        meta.sequence.length, written, floored, kept)
