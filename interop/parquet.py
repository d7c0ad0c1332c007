"""Parquet shards as the Hugging Face hub lays them out (``data/train-00000-of-00002.parquet``), written a
chunk at a time, and the nested columns the formats use built from numpy without Python loops over tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkstore.errors import DataError

#: rows per parquet file
ROWS_PER_FILE = 4096


def ragged(x: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    """One list per row of ``x`` [r, L] (or [r, L, K]: a list of K-lists), the first ``lengths[i]`` of row i."""
    offsets = np.zeros(len(x) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = x[np.arange(x.shape[1]) < np.asarray(lengths)[:, None]]
    if flat.ndim == 2:
        k = flat.shape[1]
        inner = pa.array(np.arange(flat.shape[0] + 1, dtype=np.int32) * k, pa.int32())
        values = pa.ListArray.from_arrays(inner, pa.array(flat.ravel(), type=type_))
    else:
        values = pa.array(flat, type=type_)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


class Shards:
    """Tables appended to parquet files of at most ``rows_per_file`` rows under ``out/data``; :meth:`close`
    names them ``train-NNNNN-of-MMMMM.parquet`` (what ``datasets.load_dataset(out)`` reads as its train split)."""

    def __init__(self, out: Path, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE,
                 compression: str = "zstd"):
        self.folder = out / "data"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema, self.rows_per_file, self.compression = schema, rows_per_file, compression
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        while table.num_rows:
            if self._writer is None or self._rows >= self.rows_per_file:
                self._next()
            take = min(table.num_rows, self.rows_per_file - self._rows)
            self._writer.write_table(table.slice(0, take))
            self._rows += take
            table = table.slice(take)

    def _next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        floats, others = _leaves(self.schema)
        self._writer = pq.ParquetWriter(path, self.schema, compression=self.compression, use_dictionary=others,
                                        use_byte_stream_split=floats)
        self._rows = 0

    def close(self) -> list[Path]:
        if self._writer is None:
            self._next()
        self._writer.close()
        named = []
        for i, path in enumerate(self.files):
            final = path.with_name(f"train-{i:05d}-of-{len(self.files):05d}.parquet")
            path.rename(final)
            named.append(final)
        return named


def _leaves(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """The parquet column paths of the float leaves (byte-stream-split: their bytes grouped by significance
    compress a quarter smaller, as the store's shuffle does; every parquet reader since 2020 reads it) and of
    the others (dictionary-encoded, the default)."""
    floats, others = [], []
    for f in schema:
        path, t = f.name, f.type
        while pa.types.is_list(t) or pa.types.is_large_list(t):
            path, t = path + ".list.element", t.value_type
        (floats if pa.types.is_floating(t) else others).append(path)
    return floats, others


def read_batches(paths: list[Path], columns: list[str] | None = None, batch_rows: int = 1024):
    """Record batches of the parquet files ``paths``, in order."""
    for path in paths:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


def parquet_files(src: Path, what: str) -> list[Path]:
    """The parquet files of a capture: ``src`` itself, or those under it (``data/*.parquet`` or ``*.parquet``),
    in name order."""
    if src.is_file():
        return [src]
    files = sorted(src.glob("data/*.parquet")) or sorted(src.glob("*.parquet")) if src.is_dir() else []
    if not files:
        raise DataError(f"{src} holds no parquet files ({what}: a .parquet file, or a folder of them or of "
                        "data/*.parquet)")
    return files


def list_rows(col: pa.Array, name: str) -> list[np.ndarray]:
    """A list column's rows as numpy arrays: [n_i] for a list of values, [n_i, K] for a list of lists (whose
    inner lists must all hold K)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    off = col.offsets.to_numpy()
    values = col.values
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        inner = values.offsets.to_numpy()[off[0]:off[-1] + 1]
        widths = np.diff(inner)
        k = int(widths[0]) if len(widths) else 0
        if (widths != k).any():
            row = int(np.searchsorted(off, np.flatnonzero(widths != k)[0] + off[0], side="right") - 1)
            raise DataError(f"column {name}: row {row} has positions of {int(widths[widths != k][0])} entries where "
                            f"others have {k}: every position must keep the same K")
        flat = values.values.to_numpy(zero_copy_only=False)[inner[0]:inner[-1]].reshape(-1, max(k, 1))[:, :k]
        return [flat[a - off[0]:b - off[0]] for a, b in zip(off[:-1], off[1:])]
    flat = values.to_numpy(zero_copy_only=False)
    return [flat[a:b] for a, b in zip(off[:-1], off[1:])]


def need_columns(table_or_schema, names: tuple[str, ...], what: str, path: Path) -> None:
    have = set(table_or_schema.names)
    missing = [n for n in names if n not in have]
    if missing:
        raise DataError(f"{path} is not {what}: it has no column {', '.join(missing)} (it has {', '.join(sorted(have))})")
