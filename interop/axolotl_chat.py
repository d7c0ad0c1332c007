"""axolotl's KD dataset as people keep it before axolotl tokenizes it: conversations (``messages``, ShareGPT
``conversations`` or prompt/completion) beside per-position teacher log-probabilities, as its
``chat_template`` KD strategies read them (``axolotl.integrations.kd.chat_template``): ``logprobs`` holding K
values per position with ``target_token_ids`` beside them (``load``, v2), or K ``{"token": "token_id:N",
"logprob": …}`` entries per position (``load_legacy``). Rendered here with the tokenizer's chat template;
the log-probabilities are right-aligned to the tokens as axolotl aligns them (position t's predict token
t + 1), and a position carries a loss where the token it predicts is in an assistant turn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from darkstore.chat import conversation, conversation_tokens, load_template
from darkstore.data import ChatSpec
from darkstore.errors import DataError, SpecError
from darkstore.text import load_tokenizer

from .capture import CapturedRow

#: what holds the per-position log-probabilities when no column is named ``logprobs``: the one column ending so
LOGPROBS_SUFFIX = "logprobs"


def chat_files(src: Path) -> list[Path]:
    files = [src] if src.is_file() else (sorted(src.glob("data/*.parquet")) or sorted(src.glob("*.parquet"))
                                         or sorted(src.glob("*.jsonl")))
    if not files:
        raise DataError(f"{src} holds no .parquet or .jsonl files")
    return files


def records(files: list[Path]) -> Iterator[tuple[dict[str, Any], str]]:
    for path in files:
        if path.suffix == ".parquet":
            n = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for rec in batch.to_pylist():
                    yield rec, f"{path.name} row {n}"
                    n += 1
        else:
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        yield json.loads(line), f"{path.name} line {n}"
                    except ValueError as exc:
                        raise DataError(f"{path.name} line {n} is not JSON: {exc}") from None


def logprobs_column(record: dict[str, Any], where: str) -> str:
    if "logprobs" in record:
        return "logprobs"
    named = [c for c in record if c.endswith(LOGPROBS_SUFFIX)]
    if len(named) != 1:
        raise DataError(f"{where} has no logprobs column (axolotl's logprobs_field: one column named logprobs, or "
                        f"ending in logprobs; it has {', '.join(sorted(record))})")
    return named[0]


def _targets(values: Any, ids: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """[positions, K] ids and log-probabilities of a record: v2 (values beside target_token_ids) or legacy
    (``token_id:N`` entries); a position without any (vLLM's first) is dropped."""
    if not isinstance(values, list):
        raise DataError(f"{where}: its log-probabilities are not a list per position")
    if ids is None:  # legacy: [{"token": "token_id:N", "logprob": x}, ...] per position
        pos = [p for p in values if p]
        try:
            ids = [[int(str(e["token"]).split(":")[1]) for e in p] for p in pos]
            values = [[float(e["logprob"]) for e in p] for p in pos]
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise DataError(f"{where}: a legacy entry is not {{token: 'token_id:N', logprob}} ({exc})") from None
    widths = {len(p) for p in values} | {len(p) for p in ids}
    if len(widths) != 1 or len(values) != len(ids):
        raise DataError(f"{where}: its positions keep {sorted(widths)} tokens: every position must keep the same K, "
                        "as many ids as values")
    return np.asarray(ids, dtype=np.int64), np.asarray(values, dtype=np.float64)


def chat_capture(src: Path, tokenizer: str | Path | None):
    """(files, rows) of a conversation dataset with log-probabilities (see the module's docstring)."""
    if tokenizer is None:
        raise SpecError("an axolotl dataset of conversations is rendered with the tokenizer's chat template: give "
                        "--tokenizer")
    files = chat_files(src)
    tok = load_tokenizer(tokenizer)
    template = load_template(tokenizer, tok.tokenizer, tok.specials, None)
    spec = ChatSpec()

    def rows():
        for rec, where in records(files):
            conv = conversation(rec, spec, where)
            ids, spans, _ = conversation_tokens(conv, template, tok.encode, "all", tok.eos_id)
            col = logprobs_column(rec, where)
            top, logp = _targets(rec[col], rec.get("target_token_ids"), where)
            yield _aligned(np.asarray(ids, dtype=np.int64), spans, top, logp, where)
    return files, rows


def _aligned(tokens: np.ndarray, spans, top: np.ndarray, logp: np.ndarray, where: str) -> CapturedRow:
    n = len(tokens) - 1
    pad = len(tokens) - len(top)
    if pad < 0:
        raise DataError(f"{where}: {len(top)} positions of log-probabilities for {len(tokens)} tokens: the "
                        "conversation renders shorter than it was captured (another chat template or tokenizer)")
    k = top.shape[1]
    ids, values = np.tile(np.arange(k), (n, 1)), np.full((n, k), -np.inf)
    values[:, 0] = 0.0
    ids[pad:], values[pad:] = top[:n - pad], logp[:n - pad]
    predicts = np.arange(1, n + 1)
    mask = np.zeros(n, bool)
    for a, b in spans:
        mask |= (predicts >= a) & (predicts < b)
    mask[:pad] = False
    return CapturedRow(tokens, ids, values, mask=mask)
