"""vLLM's prompt log-probabilities, as users keep them: JSON lines, each either an offline ``RequestOutput``'s
``{"prompt_token_ids": [...], "prompt_logprobs": [null, {"id": {"logprob": …, "rank": …}, …}, …]}`` or an
OpenAI-compatible server's ``/v1/completions`` answer whose choices carry ``prompt_logprobs`` and
``prompt_token_ids`` (asked for with ``"return_token_ids": true``). Every position holds the top K and, where
it is not among them, the actual next token: darkstore keeps the top K and the actual token's value."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from darkstore.errors import DataError
from teacher_service.engines.vllm import prompt_positions
from storage.errors import NonFiniteLogitsError
from teacher_service.errors import EngineAnswerError

from .base import Format
from .capture import CapturedRow

#: records whose positions tell the K a capture was made with (where --k does not)
K_PROBE_RECORDS = 16


def _files(src: Path) -> list[Path]:
    files = [src] if src.is_file() else sorted([*src.glob("*.jsonl"), *src.glob("*.json")])
    if not files:
        raise DataError(f"{src} holds no .jsonl or .json files of vLLM prompt log-probabilities")
    return files


def _records(files: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) of every prompt in the files: a RequestOutput's record, or each choice of an answer."""
    for path in files:
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{line_no}"
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where} is not JSON ({exc.msg}): vLLM captures are JSON lines") from None
                if isinstance(doc, dict) and isinstance(doc.get("choices"), list):
                    for i, choice in enumerate(doc["choices"]):
                        yield f"{where} choice {i}", choice if isinstance(choice, dict) else {}
                elif isinstance(doc, dict):
                    yield where, doc
                else:
                    raise DataError(f"{where} is not a JSON object")


def _ids(where: str, record: dict[str, Any]) -> np.ndarray:
    ids = record.get("prompt_token_ids")
    if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(t, int) for t in ids):
        raise DataError(f"{where} has no prompt_token_ids (a server answers with them when asked "
                        "\"return_token_ids\": true; a RequestOutput has them): the log-probabilities cannot be "
                        "placed without the prompt's ids")
    if not isinstance(record.get("prompt_logprobs"), list):
        raise DataError(f"{where} has no prompt_logprobs (ask for them: prompt_logprobs=K)")
    return np.asarray(ids, dtype=np.int64)


def _k(records: list[tuple[str, dict[str, Any]]]) -> int:
    """The K the first records were captured with. A position holds the top K, and the actual token where it
    is not among them (then with a rank above K): K entries, or K + 1 whose largest rank exceeds K + 1 or is
    K + 1 (ambiguous). The fewest that is certain, over every position of the first records."""
    best = None
    for where, record in records:
        for d in (record.get("prompt_logprobs") or [])[1:]:
            if not isinstance(d, dict) or not d:
                continue
            ranks = [e.get("rank") for e in d.values() if isinstance(e, dict)]
            top = max((r for r in ranks if isinstance(r, int)), default=None)
            k = len(d) - 1 if top is not None and top > len(d) else len(d)
            best = k if best is None else min(best, k)
    if best is None:
        raise DataError(f"{records[0][0]}: prompt_logprobs has no position with log-probabilities (ask for them: "
                        "prompt_logprobs=K)")
    return best


class Vllm(Format):
    name = "vllm"
    title = "vLLM prompt log-probabilities (JSON lines)"
    source = "vllm-project/vllm: RequestOutput.prompt_logprobs, /v1/completions with prompt_logprobs"
    writes = False
    not_kept = ("which positions carry a loss: every position of a prompt does",)

    def capture(self, src, k, tokenizer=None):
        files = _files(src)
        first = list(itertools.islice(_records(files), K_PROBE_RECORDS))
        if not first:
            raise DataError(f"{src} holds no records")
        k = k or _k(first)

        def rows():
            for where, record in _records(files):
                tokens = _ids(where, record)
                try:
                    ids, logp, label = prompt_positions(record["prompt_logprobs"], tokens, k, 1 << 62, where)
                except (EngineAnswerError, NonFiniteLogitsError) as exc:
                    raise DataError(str(exc).replace("engine teacher ", "")) from None
                yield CapturedRow(tokens, ids, logp, label=label)
        return files, rows
