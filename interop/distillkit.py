"""DistillKit's captured top-K parquet (``distillkit.sample_logits_vllm``): ``input_ids``, each position's
log-probabilities compressed and its token ids bit-packed as ``distillkit.compression`` lays them out, and the
``compression_config.yaml`` its ``LogprobCompressor`` reads them with.

darkstore writes the lossless configuration: all K values exact (float32, no delta encoding, no polynomial, no
residual bins) and ids of ⌈log₂ V⌉ bits, most likely first."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
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


def _width(bits: int) -> int:
    """Bytes of the big-endian integers that hold ``bits`` bits."""
    return 2 if bits <= 16 else 4 if bits <= 32 else 8


def pack_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """[..., N] non-negative integers as [..., ⌈N·bits/8⌉] bytes, most significant bit first (DistillKit's
    ``pack_to_bytes``)."""
    w = _width(bits)
    be = np.ascontiguousarray(x.astype(f">u{w}")).view(np.uint8).reshape(*x.shape, w)
    stream = np.unpackbits(be, axis=-1)[..., 8 * w - bits:]
    return np.packbits(stream.reshape(*x.shape[:-1], -1), axis=-1)


def unpack_bits(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: [..., n] int64."""
    w = _width(bits)
    stream = np.unpackbits(np.ascontiguousarray(b, dtype=np.uint8), axis=-1)[..., :n * bits]
    stream = stream.reshape(*b.shape[:-1], n, bits)
    padded = np.zeros((*stream.shape[:-1], 8 * w), dtype=np.uint8)
    padded[..., 8 * w - bits:] = stream
    return np.packbits(padded, axis=-1).view(f">u{w}")[..., 0].astype(np.int64)


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



def _bytes(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]


def _torch_dtype(dtype: str) -> torch.dtype:
    return getattr(torch, dtype)


def _floats(b: torch.Tensor, dtype: str, n: int) -> torch.Tensor:
    """[..., n · width] bytes as [..., n] values of ``dtype`` (little-endian, as DistillKit views them)."""
    return b.contiguous().view(_torch_dtype(dtype)).reshape(*b.shape[:-1], n)


def _terms(c: Config, t: int) -> torch.Tensor:
    """[t, terms] the polynomial's terms at t points, computed in the terms' dtype as DistillKit does."""
    dtype = _torch_dtype(c.term_dtype)
    pts = torch.linspace(0, 1, steps=t, dtype=dtype) if c.normalize_t else torch.arange(t, dtype=dtype)
    return torch.stack([pts ** p if isinstance(p, int) else getattr(torch, p)(pts) for p in c.polynomial_terms], -1)


def decompress(b: np.ndarray, c: Config) -> np.ndarray:
    """[n, bytes] compressed log-probabilities as [n, K] float64 (DistillKit's ``decompress_monotonic_logprobs``,
    with its dtypes at every step, so that the values are the ones its trainer reads): exact values, a
    polynomial fit with quantised residuals for the rest, and the deltas summed back."""
    x = torch.from_numpy(np.array(b, dtype=np.uint8))  # a copy: parquet buffers are read-only
    out = _torch_dtype(c.exact_dtype)
    at = c.exact_k * _bytes(c.exact_dtype)
    exact = _floats(x[:, :at], c.exact_dtype, c.exact_k)
    approx = c.k - c.exact_k
    coeffs = None
    if c.polynomial_terms:
        size = len(c.polynomial_terms) * _bytes(c.term_dtype)
        coeffs = _floats(x[:, at:at + size], c.term_dtype, len(c.polynomial_terms))
        at += size
    residual = []
    for bin_ in c.residual_bins:
        scale = _floats(x[:, at:at + _bytes(bin_.scale_dtype)], bin_.scale_dtype, 1)
        at += _bytes(bin_.scale_dtype)
        size = (bin_.element_bits * bin_.num_elements + 7) // 8
        q = torch.from_numpy(unpack_bits(x[:, at:at + size].numpy(), bin_.element_bits, bin_.num_elements))
        at += size
        if bin_.element_bits == 1:
            residual.append((q.to(torch.float32) * 2.0 - 1.0) * scale)
        else:
            residual.append((q - 2 ** (bin_.element_bits - 1)).to(torch.float32) * scale)
    used = sum(bin_.num_elements for bin_ in c.residual_bins)
    rest = torch.cat(residual, -1) if residual else torch.zeros((len(x), 0), dtype=out)
    rest = torch.nn.functional.pad(rest, (0, approx - used)) if residual else torch.zeros((len(x), approx), dtype=out)
    if coeffs is not None:
        values = (_terms(c, approx) * coeffs.unsqueeze(-2)).sum(-1) + rest.to(out)
    else:
        values = rest.to(out)
    values = torch.cat([exact.to(out), values], -1)
    if c.delta_encoding:
        values = torch.cumsum(values.float(), dim=-1).to(out)
    return values.double().numpy()


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

    def capture(self, src, k, tokenizer=None):
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
