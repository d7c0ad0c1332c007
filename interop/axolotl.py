"""axolotl's knowledge-distillation dataset (``axolotl.integrations.kd``), pre-tokenized: the columns its
``DataCollatorForKD`` pads and its top-K KL losses read, beside ``input_ids``/``attention_mask``/``labels``
(which make axolotl take the rows as already tokenized: no chat template is applied again). Imports read those
columns, or a dataset of conversations beside per-position log-probabilities (:mod:`interop.axolotl_chat`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .axolotl_chat import chat_capture, chat_files
from .base import Format
from .capture import CapturedRow
from .hf import hf_labels
from .parquet import list_rows, need_columns, parquet_files, ragged, read_batches

#: the tokenized KD columns darkstore reads (axolotl's collator input)
NEEDED = ("input_ids", "target_token_ids", "target_logprobs", "target_mask")


class Axolotl(Format):
    name = "axolotl"
    title = "axolotl's KD dataset"
    source = "axolotl-ai-cloud/axolotl@067b021c8 src/axolotl/integrations/kd (chat_template.py, collator.py, " \
             "topk_logprob/forward_kl.py)"
    not_kept = ("the tail's mass: each position's K log-probabilities are renormalised to sum to 1, as axolotl's "
                "own KD strategy does",
                "an ensemble's members and provenance beyond the manifest (darkstore-export.json)")
    columns = {
        "input_ids": "the row's n + 1 tokens (trailing padding without a loss dropped)",
        "attention_mask": "1 for each of them",
        "labels": "Hugging Face convention (-100: no loss)",
        "target_token_ids": "(n + 1) × K: at position t the K most likely next tokens, most likely first (the "
                            "last position's are placeholders, masked)",
        "target_logprobs": "(n + 1) × K: their log-probabilities at the store's temperature, renormalised over "
                           "the K",
        "target_mask": "(n + 1) × K: 1 where position t carries a loss",
    }

    def schema(self, k, vocab):
        return pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
                          ("labels", pa.list_(pa.int32())), ("target_token_ids", pa.list_(pa.list_(pa.int32()))),
                          ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
                          ("target_mask", pa.list_(pa.list_(pa.int8())))])

    def table(self, chunk, k, vocab):
        r, length = chunk.mask.shape
        n1, at = chunk.n + 1, (np.arange(r), chunk.n)  # position n of each row: the last token's, a placeholder
        ids = np.concatenate([chunk.ids, np.zeros((r, 1, k), chunk.ids.dtype)], axis=1)
        logp = chunk.logp - np.logaddexp.reduce(chunk.logp, axis=-1, keepdims=True)
        logp = np.concatenate([logp, np.zeros((r, 1, k))], axis=1)
        mask = np.concatenate([chunk.mask, np.zeros((r, 1), bool)], axis=1)
        ids[at], logp[at], mask[at] = np.arange(k), -np.inf, False
        return pa.table({
            "input_ids": ragged(chunk.tokens, n1, pa.int32()),
            "attention_mask": ragged(np.ones(chunk.tokens.shape, np.int8), n1, pa.int8()),
            "labels": ragged(hf_labels(chunk), n1, pa.int32()),
            "target_token_ids": ragged(ids, n1, pa.int32()), "target_logprobs": ragged(logp, n1, pa.float32()),
            "target_mask": ragged(np.repeat(mask[..., None], k, axis=2).astype(np.int8), n1, pa.int8()),
        })

    def capture(self, src, k, tokenizer=None):
        if not _tokenized(src):
            return chat_capture(src, tokenizer)
        files = parquet_files(src, self.title)
        schema = pq.read_schema(files[0])
        need_columns(schema, NEEDED, self.title, files[0])

        def rows():
            for batch in read_batches(files, list(NEEDED)):
                got = {c: list_rows(batch.column(c), c) for c in NEEDED}
                for j, tokens in enumerate(got["input_ids"]):
                    yield _row(tokens, *(got[c][j] for c in NEEDED[1:]))
        return files, rows


def _tokenized(src) -> bool:
    """Whether the dataset at ``src`` holds axolotl's tokenized KD columns (else: conversations to render)."""
    files = chat_files(src)
    if files[0].suffix != ".parquet":
        return False
    return "input_ids" in pq.read_schema(files[0]).names


def _row(tokens, ids, logp, mask) -> CapturedRow:
    """One tokenized row: its targets right-aligned to the tokens as axolotl aligns them (positions before
    them carry no loss), the last token's (no next token) dropped."""
    n = len(tokens) - 1
    pad = len(tokens) - len(ids)
    full_ids, full_logp = np.tile(np.arange(ids.shape[1]), (n, 1)), np.full((n, ids.shape[1]), -np.inf)
    full_mask = np.zeros(n, bool)
    full_ids[pad:], full_logp[pad:] = ids[:n - pad], logp[:n - pad]
    full_mask[pad:] = mask[:n - pad, 0] > 0
    full_logp[:pad, 0] = 0.0
    return CapturedRow(tokens.astype(np.int64), full_ids, full_logp.astype(np.float64), mask=full_mask)
