"""A vLLM server as a teacher: its OpenAI-compatible API, driven with token ids.

darkstore asks ``/v1/completions`` for the top-K log-probabilities of every position of a prompt
(``prompt_logprobs``), with the prompt as token ids (never text) and one token generated (the API needs one).
vLLM answers a list per prompt position: ``null`` for position 0 (nothing predicts the first token), then a map
from token id (a string) to ``{logprob, rank, decoded_token}`` holding the K most likely tokens and, where the
actual next token is not among them, that token too (K + 1 entries). Every answer is checked whole before it
is used (:func:`parse_answer`): a wrong shape, a token id outside the vocabulary, a positive or NaN
log-probability is an error, never a stored value.

Before a job sends any of its rows, :meth:`VllmServer.check` asks the server what it serves (``/v1/models``,
``/version``), checks its context length against the rows, asks once for K log-probabilities (a server started
with a smaller ``--max-logprobs`` refuses: one line names the setting) and compares its tokenizer with the
transfer set's on a sample of text (``/tokenize``; a server started with ``--skip-tokenizer-init`` has none, and
the member's local tokenizer and the reference comparison then carry the check).

Requests that fail for a reason that passes (the connection lost, 5xx, 429: a server restarting) are retried
until ``retry_for_s``; a 4xx is the job's fault and stops it with the server's message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from darkstore.lm import TokenizerMismatchError, folder_digest
from darkstore.modelspec import EngineSpec, ModelSpec
from darkstore.paths import resolve
from storage.errors import NonFiniteLogitsError
from storage.schema import EngineMemberRecord

from ..errors import EngineAnswerError, EngineRefusedError, EngineUnavailableError

log = logging.getLogger(__name__)

#: a returned log-probability above this is not a log-probability (rounding of log 1 is far smaller)
LOGP_SLACK = 1e-4
#: characters of the transfer set's text that the server's tokenizer is compared on
TOKENIZER_PROBE_CHARS = 2000


@dataclass
class Scored:
    """One request's rows as the engine scored them: ``ids`` and ``logp`` [rows, L, K], the K most likely tokens
    of every position, most likely first, and ``label`` [rows, L], the log-probability of the actual next token.
    Log-probabilities in float64, as the engine's float32 values parse."""

    ids: np.ndarray
    logp: np.ndarray
    label: np.ndarray


class VllmServer:
    """One member's server: its address, the served model, and a pooled HTTP client that keeps at most
    ``spec.max_in_flight`` connections open."""

    concurrent = True  # requests may be sent from several threads at once

    def __init__(self, spec: EngineSpec, name: str, api_key: str | None = None):
        self.spec, self.name = spec, name
        self.base = spec.url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        n = spec.max_in_flight
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=spec.timeout_s,
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        self.model: str | None = spec.model
        self.record: EngineMemberRecord | None = None

    @classmethod
    def connect(cls, member: ModelSpec, environ: dict[str, str]) -> "VllmServer":
        """The member's server, with the API key from the environment variable the member names."""
        spec = member.engine
        key = None
        if spec.api_key_env:
            key = environ.get(spec.api_key_env)
            if not key:
                raise EngineRefusedError(f"engine teacher {member.label!r}: its API key is read from the environment "
                                         f"variable {spec.api_key_env}, which is not set")
        return cls(spec, member.label, key)

    def close(self) -> None:
        self.http.close()

    # -- requests -------------------------------------------------------------
    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """One request, retried while the server is away (connection errors, 5xx, 429) for at most
        ``retry_for_s``, with one log line a minute; another answer is returned as it is."""
        deadline, logged, wait = None, 0.0, 0.2
        while True:
            try:
                r = self.http.request(method, path, json=body)
                if r.status_code < 500 and r.status_code != 429:
                    return r
                why = f"HTTP {r.status_code}: {_message(r)}"
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            deadline = deadline or now + self.spec.retry_for_s
            if now >= deadline:
                raise EngineUnavailableError(f"engine teacher {self.name!r} at {self.base}: no answer to {path} for "
                                             f"{self.spec.retry_for_s:g} s (last: {why})")
            if now - logged >= 60:
                log.warning("engine %s at %s: %s; retrying for up to %.0f s more", self.name, self.base, why,
                            deadline - now)
                logged = now
            time.sleep(min(wait, max(0.0, deadline - now)))
            wait = min(wait * 2, 5.0)

    def request_body(self, rows: np.ndarray, k: int) -> dict[str, Any]:
        """The completion request for ``rows`` [r, L + 1] token ids: their top-``k`` prompt log-probabilities."""
        return {"model": self.model, "prompt": rows.tolist(), "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": k}

    def score(self, rows: np.ndarray, k: int, vocab: int) -> Scored:
        """The top-``k`` log-probabilities of every position of ``rows`` [r, L + 1], checked."""
        r = self.call("POST", "/v1/completions", self.request_body(rows, k))
        if r.status_code != 200:
            raise EngineRefusedError(f"engine teacher {self.name!r} refused a request: HTTP {r.status_code}: "
                                     f"{_message(r)}")
        try:
            payload = r.json()
        except ValueError as exc:
            raise EngineAnswerError(f"engine teacher {self.name!r} answered something that is not JSON") from exc
        return parse_answer(payload, rows, k, vocab, self.name)

    # -- checks before a job --------------------------------------------------
    def check(self, *, k: int, length: int, tokenizer: Any, sample_text: str) -> EngineMemberRecord:
        """What the server serves, checked against the job before any of its rows is sent."""
        self.record = self.describe()
        if self.record.max_model_len is not None and self.record.max_model_len < length + 2:
            raise EngineRefusedError(f"engine teacher {self.name!r}: its server takes {self.record.max_model_len} "
                                     f"tokens (--max-model-len), and rows of {length} positions need {length + 2} "
                                     f"(the row's {length + 1} tokens and the one token every request generates)")
        self.check_tokenizer(tokenizer, sample_text)
        self.check_logprobs(k, tokenizer.eos_id or 0)
        return self.record

    def describe(self) -> EngineMemberRecord:
        r = self.call("GET", "/v1/models")
        if r.status_code != 200:
            raise EngineRefusedError(f"engine teacher {self.name!r}: {self.base}/v1/models answered HTTP "
                                     f"{r.status_code}: {_message(r)}")
        models = {m.get("id"): m for m in r.json().get("data", [])}
        if self.model is None:
            if len(models) != 1:
                raise EngineRefusedError(f"engine teacher {self.name!r}: the server serves {len(models)} models "
                                         f"({', '.join(map(str, models))}); name one with model:")
            self.model = next(iter(models))
        if self.model not in models:
            raise EngineRefusedError(f"engine teacher {self.name!r}: the server at {self.base} does not serve "
                                     f"{self.model!r} (it serves {', '.join(map(str, models)) or 'nothing'})")
        info = models[self.model]
        v = self.call("GET", "/version")
        version = v.json().get("version", "?") if v.status_code == 200 else "?"
        return EngineMemberRecord(name=self.name, engine=f"{self.spec.kind} {version}", model=self.model,
                                  root=info.get("root"), max_model_len=info.get("max_model_len"))

    def check_logprobs(self, k: int, token: int) -> None:
        """One request of two tokens asking for ``k`` log-probabilities: refused by a server whose
        ``--max-logprobs`` is smaller."""
        r = self.call("POST", "/v1/completions", self.request_body(np.array([[token, token]]), k))
        if r.status_code == 200:
            return
        text = _message(r)
        if r.status_code == 400 and "logprob" in text.lower():
            raise EngineRefusedError(f"engine teacher {self.name!r}: targets topk:{k} need {k} log-probabilities "
                                     f"per position, more than the server allows: start it with --max-logprobs "
                                     f"{k} or more (it said: {text})")
        raise EngineRefusedError(f"engine teacher {self.name!r}: a probe request failed: HTTP {r.status_code}: {text}")

    def check_tokenizer(self, tokenizer: Any, text: str) -> None:
        """The server's tokenizer encodes ``text`` as the transfer set's does (skipped, with a log line, where
        the server runs without one)."""
        if not text:
            return
        r = self.call("POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        if r.status_code != 200:
            log.info("engine %s: the server has no tokenizer to compare (%s); the member's local tokenizer and the "
                     "reference comparison check it", self.name, _message(r))
            return
        theirs = list(r.json().get("tokens", []))
        ours = tokenizer.encode([text])[0]
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise TokenizerMismatchError(f"engine teacher {self.name!r}: the server's tokenizer differs from the "
                                         f"transfer set's ({tokenizer.path}): the same text gives other token ids "
                                         f"from token {at} on ({len(theirs)} ids against {len(ours)})")


def _message(r: httpx.Response) -> str:
    """The error message in an answer, in one line."""
    try:
        body = r.json()
    except ValueError:
        return r.text.strip().replace("\n", " ")[:300]
    err = body.get("error", body) if isinstance(body, dict) else body
    msg = err.get("message", err) if isinstance(err, dict) else err
    return str(msg).replace("\n", " ")[:300]


def parse_answer(payload: Any, rows: np.ndarray, k: int, vocab: int, name: str) -> Scored:
    """A completion answer for ``rows`` [r, L + 1] as arrays, checked whole (:class:`Scored`)."""
    r, n = rows.shape
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or len(choices) != r:
        raise EngineAnswerError(f"engine teacher {name!r} answered {len(choices) if isinstance(choices, list) else 0} "
                                f"choices for {r} prompts")
    ids = np.zeros((r, n - 1, k), dtype=np.int64)
    logp = np.zeros((r, n - 1, k), dtype=np.float64)
    label = np.zeros((r, n - 1), dtype=np.float64)
    for c in choices:
        i = c.get("index") if isinstance(c, dict) else None
        if not isinstance(i, int) or not 0 <= i < r:
            raise EngineAnswerError(f"engine teacher {name!r} answered a choice without a valid index")
        ids[i], logp[i], label[i] = prompt_positions(c.get("prompt_logprobs"), rows[i], k, vocab, f"{name!r}, prompt {i}")
    return Scored(ids, logp, label)


def prompt_positions(plp: Any, tokens: np.ndarray, k: int, vocab: int, who: str) -> tuple[np.ndarray, ...]:
    """One prompt's ``prompt_logprobs`` as [L, K] ids and log-probabilities (most likely first) and [L] the
    actual next tokens' log-probabilities."""
    n = len(tokens)
    if not isinstance(plp, list) or len(plp) != n:
        raise EngineAnswerError(f"engine teacher {who}: prompt_logprobs has {len(plp) if isinstance(plp, list) else 0} "
                                f"entries for {n} tokens (is the server's --max-logprobs set?)")
    ids = np.zeros((n - 1, k + 1), dtype=np.int64)
    logp = np.full((n - 1, k + 1), -np.inf)
    for p, d in enumerate(plp[1:]):
        if not isinstance(d, dict) or not k <= len(d) <= k + 1:
            raise EngineAnswerError(f"engine teacher {who}: position {p} has {len(d) if isinstance(d, dict) else 0} "
                                    f"log-probabilities, not {k} (or {k + 1} with the actual token)")
        try:
            ids[p, :len(d)] = [int(t) for t in d]
            logp[p, :len(d)] = [e["logprob"] for e in d.values()]
        except (TypeError, KeyError, ValueError) as exc:
            raise EngineAnswerError(f"engine teacher {who}: position {p} is malformed ({exc})") from exc
    filled = np.arange(k + 1) < np.array([len(d) for d in plp[1:]])[:, None]
    return _checked(ids, logp, filled, tokens[1:], k, vocab, who)


def _checked(ids: np.ndarray, logp: np.ndarray, filled: np.ndarray, labels: np.ndarray, k: int, vocab: int,
             who: str) -> tuple[np.ndarray, ...]:
    if np.isnan(logp[filled]).any() or np.isposinf(logp[filled]).any():
        p = int(np.flatnonzero((np.isnan(logp) | np.isposinf(logp)).any(1))[0])
        raise NonFiniteLogitsError(f"engine teacher {who}: NaN/Inf log-probabilities at position {p}; nothing of its "
                                   "chunk was written")
    if (logp[filled] > LOGP_SLACK).any():
        raise EngineAnswerError(f"engine teacher {who}: a log-probability above 0 ({logp[filled].max():.3g}): these "
                                "are not normalised log-probabilities")
    if ((ids < 0) | (ids >= vocab))[filled].any():
        bad = int(ids[filled & ((ids < 0) | (ids >= vocab))][0])
        raise EngineAnswerError(f"engine teacher {who}: token id {bad} is outside the transfer set's vocabulary of "
                                f"{vocab} (the model's head is wider than its tokenizer, or another tokenizer)")
    at_label = (ids == labels[:, None]) & filled
    if not at_label.any(1).all():
        p = int(np.flatnonzero(~at_label.any(1))[0])
        raise EngineAnswerError(f"engine teacher {who}: position {p} lacks the actual next token's "
                                "log-probability (it is always returned): the answer is not for this prompt")
    label = np.take_along_axis(logp, at_label.argmax(1)[:, None], 1)[:, 0]
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logp, order, 1), label


def engine_digest(member: ModelSpec, record: EngineMemberRecord | None, roots: Sequence[str | Path] | None) -> str:
    """What identifies an engine member's model in a job key: its local weights' digest where the member names
    them (the reference), else the model the engine reports having loaded (its path or hub name)."""
    if member.weights:
        return folder_digest(member.label, resolve(member.weights, roots=roots))
    if member.engine.engine_args is not None:  # in this process: the model directory it loads, where local
        model = str(member.engine.engine_args["model"])
        if Path(model).is_absolute() or Path(model).exists():
            folder = resolve(model, roots=roots)
            if (folder / "config.json").is_file():
                return folder_digest(member.label, folder)
        what = {"engine": member.engine.kind, "model": model}
    else:
        what = {"engine": member.engine.kind, "root": record.root if record else None,
                "model": record.model if record else member.engine.model}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
