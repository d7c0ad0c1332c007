"""A plain Hugging Face ``datasets`` layout of per-position top-K targets: parquet shards that
``datasets.load_dataset(folder)`` reads, for TRL and any training loop of one's own."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import Format
from .parquet import ragged
from .rows import TokenChunk


def hf_labels(chunk: TokenChunk) -> list[np.ndarray]:
    """Labels in the Hugging Face convention (the model shifts them): ``labels[t + 1] = input_ids[t + 1]`` where
    position t carries a loss, else -100; ``labels[0] = -100``."""
    out = []
    for tokens, mask in zip(chunk.tokens, chunk.mask):
        lab = np.full(len(tokens), -100, dtype=np.int32)
        lab[1:][mask] = tokens[1:][mask]
        out.append(lab)
    return out


class HuggingFace(Format):
    name = "hf"
    title = "a Hugging Face datasets top-K layout"
    source = "huggingface/datasets (parquet shards under data/, the hub's layout)"
    not_kept = ("an ensemble's members and provenance beyond the manifest (darkstore-export.json)",)
    columns = {
        "row": "the row's number in the store",
        "index": "the transfer-set record the row was made from",
        "input_ids": "the row's n + 1 tokens (trailing padding without a loss dropped)",
        "attention_mask": "1 for each of them",
        "labels": "Hugging Face convention: labels[t + 1] = input_ids[t + 1] where position t carries a loss, "
                  "else -100",
        "topk_ids": "n × K: at position t the K most likely next tokens, most likely first",
        "topk_logprobs": "n × K: their log-probabilities at the store's temperature (normalised over the whole "
                         "vocabulary: they sum to 1 − exp(tail_logprob))",
        "tail_logprob": "n: the log of the mass left out of the top K",
    }

    def schema(self, k, vocab):
        return pa.schema([("row", pa.int64()), ("index", pa.int64()), ("input_ids", pa.list_(pa.int32())),
                          ("attention_mask", pa.list_(pa.int8())), ("labels", pa.list_(pa.int32())),
                          ("topk_ids", pa.list_(pa.list_(pa.int32()))),
                          ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
                          ("tail_logprob", pa.list_(pa.float32()))])

    def table(self, chunk, k, vocab):
        return pa.table({
            "row": pa.array(chunk.rows, pa.int64()), "index": pa.array(chunk.index, pa.int64()),
            "input_ids": ragged([t.astype(np.int32) for t in chunk.tokens], pa.int32()),
            "attention_mask": ragged([np.ones(len(t), np.int8) for t in chunk.tokens], pa.int8()),
            "labels": ragged(hf_labels(chunk), pa.int32()),
            "topk_ids": ragged([i.astype(np.int32) for i in chunk.ids], pa.int32()),
            "topk_logprobs": ragged([v.astype(np.float32) for v in chunk.logp], pa.float32()),
            "tail_logprob": ragged([t.astype(np.float32) for t in chunk.tail], pa.float32()),
        })
