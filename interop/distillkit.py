"""DistillKit's captured top-K parquet (``distillkit.sample_logits_vllm``): ``input_ids``, each position's
log-probabilities compressed and its token ids bit-packed as ``distillkit.compression`` lays them out, and the
``compression_config.yaml`` its ``LogprobCompressor`` reads them with.

darkstore writes the lossless configuration: all K values exact (float32, no delta encoding, no polynomial, no
residual bins) and ids of ⌈log₂ V⌉ bits, most likely first."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, Field, ValidationError

from darkstore.errors import DataError

from .base import Format
from .capture import CapturedRow
from .parquet import list_rows, need_columns, parquet_files, ragged, read_batches

CONFIG = "compression_config.yaml"


def index_bits(vocab: int) -> int:
    """Bits per token id: ⌈log₂ d⌉, as DistillKit's compressor computes them."""
    return max(1, math.ceil(math.log2(vocab)))


def pack_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """[..., N] non-negative integers as [..., ⌈N·bits/8⌉] bytes, most significant bit first (DistillKit's
    ``pack_to_bytes``)."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((x.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(*x.shape[:-1], -1), axis=-1)


def unpack_bits(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: [..., n] int64."""
    stream = np.unpackbits(b.astype(np.uint8), axis=-1)[..., :n * bits].reshape(*b.shape[:-1], n, bits)
    return (stream.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(-1)


def exact_config(vocab: int, k: int) -> dict:
    """DistillKit's ``DistributionQuantizationConfig`` that keeps all K values exactly."""
    return {"d": vocab, "k": k, "exact_k": k, "exact_dtype": "float32", "polynomial_terms": None,
            "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
            "normalize_t": False}


class Bin(BaseModel):
    scale_dtype: str
    element_bits: int = Field(ge=1, le=64)
    num_elements: int = Field(ge=1)


class Config(BaseModel):
    """DistillKit's ``DistributionQuantizationConfig`` (distillkit/compression/config.py), as read here."""

    d: int = Field(gt=0)
    k: int = Field(gt=0)
    exact_k: int = Field(ge=0)
    exact_dtype: str = "float32"
    polynomial_terms: list[int | str] | None = None
    term_dtype: str = "float32"
    residual_bins: list[Bin] = []
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    def value_bytes(self) -> int:
        n = self.exact_k * _width(self.exact_dtype) + len(self.polynomial_terms or ()) * _width(self.term_dtype)
        return n + sum(_width(b.scale_dtype) + (b.element_bits * b.num_elements + 7) // 8 for b in self.residual_bins)


def _width(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]


def _floats(b: np.ndarray, dtype: str, n: int) -> np.ndarray:
    """[..., n · width] little-endian bytes as [..., n] float64 values of ``dtype`` (bfloat16 included)."""
    b = np.ascontiguousarray(b)
    if dtype == "bfloat16":
        return (b.view("<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64).reshape(*b.shape[:-1], n)
    return b.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(np.float64).reshape(
        *b.shape[:-1], n)


def decompress(b: np.ndarray, c: Config) -> np.ndarray:
    """[n, bytes] compressed log-probabilities as [n, K] (DistillKit's ``decompress_monotonic_logprobs``):
    exact values, a polynomial fit with quantised residuals for the rest, and the deltas summed back."""
    at = c.exact_k * _width(c.exact_dtype)
    exact = _floats(b[:, :at], c.exact_dtype, c.exact_k)
    approx = c.k - c.exact_k
    fit = np.zeros((len(b), approx))
    if c.polynomial_terms:
        n_terms = len(c.polynomial_terms)
        coeffs = _floats(b[:, at:at + n_terms * _width(c.term_dtype)], c.term_dtype, n_terms)
        at += n_terms * _width(c.term_dtype)
        t = np.linspace(0, 1, approx) if c.normalize_t else np.arange(approx, dtype=np.float64)
        x = np.stack([t ** p if isinstance(p, int) else getattr(np, p)(t) for p in c.polynomial_terms], -1)
        fit = coeffs @ x.T
    residual, used = [], 0
    for bin_ in c.residual_bins:
        scale = _floats(b[:, at:at + _width(bin_.scale_dtype)], bin_.scale_dtype, 1)
        at += _width(bin_.scale_dtype)
        size = (bin_.element_bits * bin_.num_elements + 7) // 8
        q = unpack_bits(b[:, at:at + size], bin_.element_bits, bin_.num_elements).astype(np.float64)
        at += size
        residual.append((q * 2 - 1) * scale if bin_.element_bits == 1 else (q - 2 ** (bin_.element_bits - 1)) * scale)
        used += bin_.num_elements
    if residual:
        fit[:, :used] += np.concatenate(residual, axis=1)
    values = np.concatenate([exact, fit], axis=1)
    return np.cumsum(values, axis=1) if c.delta_encoding else values


def read_config(src: Path) -> Config:
    folder = src if src.is_dir() else src.parent
    path = folder / CONFIG
    if not path.is_file():
        raise DataError(f"{folder} has no {CONFIG}: DistillKit writes the compression configuration beside its "
                        "parquet files, and it is needed to read them")
    try:
        return Config.model_validate(yaml.safe_load(path.read_text()))
    except (ValidationError, yaml.YAMLError) as exc:
        raise DataError(f"{path} is not a DistillKit compression configuration: {str(exc).splitlines()[0]}") from None


class DistillKit(Format):
    name = "distillkit"
    title = "DistillKit's compressed parquet"
    source = "arcee-ai/DistillKit@a61c2e7 distillkit/sample_logits_vllm.py, distillkit/compression"
    not_kept = ("the tail's mass as a value of its own (it is 1 − Σ exp of the K log-probabilities, to float32)",
                "an ensemble's members and provenance beyond the manifest (darkstore-export.json)")
    columns = {
        "input_ids": "the row's n + 1 tokens (trailing padding without a loss dropped)",
        "labels": "position t's label, the next token, or -100 where it carries no loss (DistillKit masks "
                  "position t by labels[t] ≥ 0); the last is -100",
        "compressed_logprobs": "n × 4K bytes: the K log-probabilities at position t (float32, most likely first)",
        "bytepacked_indices": "n × ⌈K·⌈log₂ V⌉/8⌉ bytes: their token ids, bit-packed",
    }

    def schema(self, k, vocab):
        return pa.schema([("input_ids", pa.list_(pa.uint64())), ("labels", pa.list_(pa.int64())),
                          ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                          ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])

    def table(self, chunk, k, vocab):
        r, length = chunk.mask.shape
        labels = np.full((r, length + 1), -100, dtype=np.int64)
        labels[:, :length] = np.where(chunk.mask, chunk.tokens[:, 1:], -100)
        values = np.ascontiguousarray(chunk.logp.astype("<f4")).view(np.uint8)
        return pa.table({
            "input_ids": ragged(chunk.tokens, chunk.n + 1, pa.uint64()),
            "labels": ragged(labels, chunk.n + 1, pa.int64()),
            "compressed_logprobs": ragged(values, chunk.n, pa.uint8()),
            "bytepacked_indices": ragged(pack_bits(chunk.ids, index_bits(vocab)), chunk.n, pa.uint8()),
        })

    def extra_files(self, out, reader, k):
        (out / CONFIG).write_text(yaml.safe_dump(exact_config(reader.meta.num_classes, k), sort_keys=False))

    def capture(self, src, k):
        files = parquet_files(src, self.title)
        schema = pq.read_schema(files[0])
        raw = {"token_ids", "top_values"} <= set(schema.names)
        if not raw and {"packed_indices", "exact_values", "coeffs"} <= set(schema.names):
            raise DataError(f"{files[0]} is DistillKit's legacy compressed format: darkstore reads its current one "
                            "(compressed_logprobs, bytepacked_indices) and the raw one (token_ids, top_values)")
        need_columns(schema, ("input_ids",) + (("token_ids", "top_values") if raw else
                                               ("compressed_logprobs", "bytepacked_indices")), self.title, files[0])
        config = None if raw else read_config(src)
        columns = [c for c in schema.names if c in ("input_ids", "labels", "token_ids", "top_values",
                                                     "compressed_logprobs", "bytepacked_indices")]

        def rows():
            for batch in read_batches(files, columns):
                got = {c: list_rows(batch.column(c), c) for c in columns}
                for j, tokens in enumerate(got["input_ids"]):
                    n = len(tokens) - 1
                    if raw:
                        ids, logp = got["token_ids"][j], got["top_values"][j].astype(np.float64)
                    else:
                        logp = decompress(got["compressed_logprobs"][j], config)
                        ids = unpack_bits(got["bytepacked_indices"][j], index_bits(config.d), config.k)
                    labels = got["labels"][j] if "labels" in got else None
                    yield CapturedRow(tokens.astype(np.int64), ids[:n].astype(np.int64), logp[:n],
                                      mask=None if labels is None else labels[:n] >= 0)
        return files, rows
