"""DistillKit's captured top-K parquet (``distillkit.sample_logits_vllm``): ``input_ids``, each position's
log-probabilities compressed and its token ids bit-packed as ``distillkit.compression`` lays them out, and the
``compression_config.yaml`` its ``LogprobCompressor`` reads them with.

darkstore writes the lossless configuration: all K values exact (float32, no delta encoding, no polynomial, no
residual bins) and ids of ⌈log₂ V⌉ bits, most likely first."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import yaml

from .base import Format
from .parquet import ragged

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
        bits = index_bits(vocab)
        labels = []
        for tokens, mask in zip(chunk.tokens, chunk.mask):
            lab = np.full(len(tokens), -100, dtype=np.int64)
            lab[:-1][mask] = tokens[1:][mask]
            labels.append(lab)
        values = [np.ascontiguousarray(v.astype("<f4")).view(np.uint8) for v in chunk.logp]
        return pa.table({
            "input_ids": ragged([t.astype(np.uint64) for t in chunk.tokens], pa.uint64()),
            "labels": ragged(labels, pa.int64()),
            "compressed_logprobs": ragged(values, pa.uint8()),
            "bytepacked_indices": ragged([pack_bits(i, bits) for i in chunk.ids], pa.uint8()),
        })

    def extra_files(self, out, reader, k):
        (out / CONFIG).write_text(yaml.safe_dump(exact_config(reader.meta.num_classes, k), sort_keys=False))
