"""A plain Hugging Face ``datasets`` layout of per-position top-K targets: parquet shards that
``datasets.load_dataset(folder)`` reads, for TRL and any training loop of one's own."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .base import Format
from .capture import CapturedRow
from .parquet import list_rows, need_columns, parquet_files, ragged, read_batches
from .rows import TokenChunk

#: what a capture in this layout must have (labels and tail_logprob are read where present)
NEEDED = ("input_ids", "topk_ids", "topk_logprobs")


def hf_labels(chunk: TokenChunk) -> np.ndarray:
    """[r, L + 1] labels in the Hugging Face convention (the model shifts them): ``labels[t + 1] =
    tokens[t + 1]`` where position t carries a loss, else -100; ``labels[0] = -100``."""
    labels = np.full(chunk.tokens.shape, -100, dtype=np.int32)
    labels[:, 1:] = np.where(chunk.mask, chunk.tokens[:, 1:], -100)
    return labels


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
        n, n1 = chunk.n, chunk.n + 1
        return pa.table({
            "row": pa.array(chunk.rows, pa.int64()), "index": pa.array(chunk.index, pa.int64()),
            "input_ids": ragged(chunk.tokens, n1, pa.int32()),
            "attention_mask": ragged(np.ones(chunk.tokens.shape, np.int8), n1, pa.int8()),
            "labels": ragged(hf_labels(chunk), n1, pa.int32()),
            "topk_ids": ragged(chunk.ids, n, pa.int32()), "topk_logprobs": ragged(chunk.logp, n, pa.float32()),
            "tail_logprob": ragged(chunk.tail, n, pa.float32()),
        })

    def capture(self, src, k, tokenizer=None):
        files = parquet_files(src, self.title)
        schema = pq.read_schema(files[0])
        need_columns(schema, NEEDED, self.title, files[0])
        columns = [c for c in (*NEEDED, "labels", "tail_logprob") if c in schema.names]

        def rows():
            for batch in read_batches(files, columns):
                got = {c: list_rows(batch.column(c), c) for c in columns}
                for j, tokens in enumerate(got["input_ids"]):
                    n = len(tokens) - 1
                    labels = got["labels"][j] if "labels" in got else None
                    yield CapturedRow(tokens.astype(np.int64), got["topk_ids"][j][:n].astype(np.int64),
                                      got["topk_logprobs"][j][:n].astype(np.float64),
                                      mask=None if labels is None else labels[1:n + 1] != -100,
                                      tail=got["tail_logprob"][j][:n].astype(np.float64) if "tail_logprob" in got
                                      else None)
        return files, rows
