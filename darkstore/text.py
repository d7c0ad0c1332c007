"""Text transfer sets: a corpus and a local tokenizer, cut into fixed-length token sequences.

A row holds ``length + 1`` token ids: the model reads the first ``length`` and position *t*'s label is token
*t + 1*. A loss mask says which positions carry a loss.

- ``packed``: every document is tokenised and ended by the tokenizer's EOS; the stream is cut into rows of
  ``length`` positions (row *r* holds tokens ``[r·L, r·L + L]``: consecutive rows share one token); what is
  left at the end, less than a row, is dropped. Every position carries a loss.
- ``records``: one record per row: its prompt (no loss), its response and EOS (loss), truncated to the row,
  padded with the tokenizer's pad token (or EOS) where the loss mask is 0.

Tokenizers load from local files only (``tokenizers``; a directory without ``tokenizer.json`` through
``transformers``' ``AutoTokenizer`` with ``local_files_only``). Their fingerprint (:func:`tokenizer_fingerprint`)
is a sha256 over the canonical JSON, so two tokenizers that split text alike and number tokens alike have the
same one, wherever they lie.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from darkstore.errors import DataError, DataNotFoundError, SpecError

from .chat import ChatRows, ChatTemplate, chat_rows, conversation, load_template, prompt_text
from .data import TextSpec, TransferSet
from .records import raw_records, read_text

log = logging.getLogger(__name__)

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@dataclass
class LoadedTokenizer:
    """A tokenizer from local files, with what a store records of it."""

    tokenizer: Any  # tokenizers.Tokenizer
    path: str
    eos_id: int | None
    pad_id: int | None
    specials: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, … as its configuration names them

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer, self.eos_id, self.pad_id)

    def canonical(self) -> dict[str, Any]:
        return json.loads(self.tokenizer.to_str())

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def render_row(tok: LoadedTokenizer, tokens: list[int], mask: list[int], chars: int = 600) -> list[tuple[str, bool]]:
    """A stored row as text, in runs that carry a loss (True) or not (the prompt, the template's markers), the
    padding after the last token with a loss left out; at most the last ``chars`` characters."""
    last = max((t for t, on in enumerate(mask) if on), default=len(mask) - 1) + 2  # tokens through the last label
    runs: list[tuple[list[int], bool]] = []
    for j, t in enumerate(tokens[:last]):
        on = bool(j and mask[j - 1])  # token j is position j - 1's label
        if runs and runs[-1][1] == on:
            runs[-1][0].append(t)
        else:
            runs.append(([t], on))
    out = [(tok.tokenizer.decode(ids, skip_special_tokens=False), on) for ids, on in runs]
    total, kept = 0, []
    for text, on in reversed(out):
        if total + len(text) > chars:
            kept.append(("…" + text[len(text) - (chars - total):], on))
            break
        kept.append((text, on))
        total += len(text)
    return kept[::-1]


def tokenizer_fingerprint(tokenizer: Any, eos_id: int | None, pad_id: int | None) -> str:
    canon = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(b"darkstore-tokenizer-v1\0")
    h.update(canon.encode())
    h.update(f"\0eos={eos_id}\0pad={pad_id}".encode())
    return h.hexdigest()


def load_tokenizer(path: str | Path) -> LoadedTokenizer:
    """A tokenizer from a local directory or ``tokenizer.json``; never downloads."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"tokenizer {str(path)!r} does not exist: give a directory holding tokenizer.json "
                                "or the file itself")
    folder = path if path.is_dir() else path.parent
    config = _special_tokens(folder)
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise SpecError("text transfer sets need the tokenizers package: pip install 'darkstore[lm]'") from exc
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 — the Rust side raises a plain Exception
            raise DataError(f"{file} is not a readable tokenizer: {exc}") from exc
    else:
        tok = _transformers_tokenizer(folder)
    eos = _token_id(tok, config.get("eos_token")) if config.get("eos_token") else None
    if eos is None:
        eos = next((i for t in EOS_CANDIDATES if (i := tok.token_to_id(t)) is not None), None)
    pad = _token_id(tok, config.get("pad_token")) if config.get("pad_token") else None
    return LoadedTokenizer(tok, str(path), eos, pad, config)


SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _special_tokens(folder: Path) -> dict[str, Any]:
    """The special tokens (:data:`SPECIALS`) as tokenizer_config.json or special_tokens_map.json name them."""
    out: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            try:
                raw = json.loads(f.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{f} is not readable JSON: {exc}") from exc
            for key in SPECIALS:
                v = raw.get(key)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    out[key] = v
    return out


def _token_id(tok: Any, text: str) -> int | None:
    i = tok.token_to_id(text)
    if i is None:
        raise DataError(f"the tokenizer's configuration names the special token {text!r}, which its vocabulary lacks")
    return int(i)


def _transformers_tokenizer(folder: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise SpecError(f"{folder} holds no tokenizer.json; loading another format needs transformers: "
                        "pip install 'darkstore[lm]'") from exc
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as exc:  # noqa: BLE001 — transformers raises many types for a folder it cannot read
        raise DataError(f"{folder} holds no tokenizer.json and transformers cannot load a tokenizer from it: "
                        f"{type(exc).__name__}: {exc}") from exc
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"the tokenizer in {folder} has no fast (tokenizers) form; save it with tokenizer.json")
    return backend


# --- the corpus ------------------------------------------------------------------------------------------
def read_documents(spec: TextSpec, root: Path) -> list[tuple[str, str]]:
    """(prompt, text) per document or record, in a fixed order (prompt "" where there is none)."""
    if spec.format == "files":
        files = [root] if root.is_file() else sorted(p for p in root.glob(spec.glob) if p.is_file())
        if not files:
            raise DataError(f"no files match {spec.glob!r} under {root}: the corpus is empty")
        return [("", read_text(p)) for p in files]
    return [_record(raw, spec, where) for raw, where in raw_records(spec.format, root, spec.split)]


def _record(raw: Any, spec: TextSpec, where: str) -> tuple[str, str]:
    if not isinstance(raw, dict) or not isinstance(raw.get(spec.field), str):
        raise DataError(f"{where} has no text column {spec.field!r} (field:)")
    prompt = ""
    if spec.prompt is not None:
        if not isinstance(raw.get(spec.prompt), str):
            raise DataError(f"{where} has no prompt column {spec.prompt!r} (prompt:)")
        prompt = raw[spec.prompt]
    return prompt, raw[spec.field]


@dataclass
class Rows:
    """Token rows and their loss mask, with what they were made from."""

    tokens: np.ndarray  # [N, L + 1] int64
    mask: np.ndarray  # [N, L] uint8
    text_bytes: int
    dropped: str = ""  # what did not fit, in words


def pack(ids: list[list[int]], length: int, eos: int) -> np.ndarray:
    """Documents joined, each ended by ``eos``, cut into rows of ``length + 1`` tokens (consecutive rows share
    one token); the remainder is dropped."""
    stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
    n = (len(stream) - 1) // length
    if n == 0:
        raise DataError(f"the corpus holds {len(stream)} tokens, fewer than one row of {length + 1}: give more text "
                        "or a shorter length")
    starts = np.arange(n)[:, None] * length
    return stream[starts + np.arange(length + 1)]


def records(prompts: list[list[int]], responses: list[list[int]], length: int, eos: int, pad: int
            ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One row per record: prompt, response, EOS, truncated to ``length + 1`` tokens and padded with ``pad``.
    Returns tokens, mask, and how many records were truncated and left out (no position with a loss)."""
    toks, masks, truncated, empty = [], [], 0, 0
    for p, r in zip(prompts, responses):
        seq = [*p, *r, eos]
        if len(seq) > length + 1:
            truncated += 1
            seq = seq[:length + 1]
        target = np.zeros(length, dtype=np.uint8)  # position t predicts token t + 1
        target[max(len(p) - 1, 0):len(seq) - 1] = 1
        if not target.any():
            empty += 1
            continue
        toks.append(seq + [pad] * (length + 1 - len(seq)))
        masks.append(target)
    if not toks:
        raise DataError(f"no record leaves a response token inside a row of {length + 1} tokens: give a longer "
                        "length")
    return np.asarray(toks, dtype=np.int64), np.stack(masks), truncated, empty


def make_rows(spec: TextSpec, docs: list[tuple[str, str]], tok: LoadedTokenizer) -> Rows:
    if not docs or not any(text for _, text in docs):
        raise DataError("the text corpus is empty: no document holds any text")
    if tok.eos_id is None:
        raise DataError(f"the tokenizer at {tok.path} has no EOS token (eos_token in tokenizer_config.json, or one "
                        f"of {', '.join(EOS_CANDIDATES)}): rows need one to end each document")
    text_bytes = sum(len(p.encode()) + len(t.encode()) for p, t in docs)
    ids = tok.encode([t for _, t in docs])
    if spec.packing == "packed":
        tokens = pack(ids, spec.length, tok.eos_id)
        used = tokens.shape[0] * spec.length
        total = sum(len(d) + 1 for d in ids)
        mask = np.ones((tokens.shape[0], spec.length), dtype=np.uint8)
        return Rows(tokens, mask, round(text_bytes * min(1.0, used / max(total, 1))),
                    f"{total - used - 1} tokens at the end" if total - used - 1 > 0 else "")
    prompts = tok.encode([p for p, _ in docs]) if spec.prompt is not None else [[] for _ in docs]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    tokens, mask, truncated, empty = records(prompts, ids, spec.length, tok.eos_id, pad)
    said = [f"{truncated} records truncated"] * bool(truncated) + [f"{empty} records with no response inside "
                                                                  "a row left out"] * bool(empty)
    return Rows(tokens, mask, text_bytes, "; ".join(said))


class TextSet(TransferSet):
    """Token rows of a text corpus: ``get_batch(rows)`` gives tokens [B, L + 1] and the loss mask [B, L].
    ``template``: the chat template of a chat set (None otherwise)."""

    decodes = False

    def __init__(self, spec: TextSpec, root: Path, tokenizer: Path, chat_template: Path | None = None):
        self.spec, self.root = spec, root
        if not root.exists():
            raise DataNotFoundError(f"text corpus {str(root)!r} does not exist")
        self.tokenizer = load_tokenizer(tokenizer)
        self.template: ChatTemplate | None = None
        if spec.packing == "chat":
            self.template = load_template(tokenizer, self.tokenizer.tokenizer, self.tokenizer.specials,
                                          chat_template)

    @cached_property
    def rows(self) -> Rows:
        """The set's token rows, made when first read (a responses job reads only its prompts)."""
        rows = self._chat_rows(self.root) if self.template is not None else \
            make_rows(self.spec, read_documents(self.spec, self.root), self.tokenizer)
        if rows.dropped:
            log.info("text corpus %s: %s", self.root, rows.dropped)
        if int(rows.tokens.max()) >= self.tokenizer.vocab_size:
            raise DataError("the tokenizer produced ids beyond its own vocabulary size")
        return rows

    def prompt_set(self, n: int) -> "PromptSet":
        return PromptSet(self, n)

    def prompts(self) -> list[str]:
        """Each record's prompt, for teachers to answer: a conversation without its closing assistant turn,
        rendered with the generation prompt (chat), or a record's prompt column (records)."""
        if self.template is not None:
            convs = [conversation(raw, self.spec.chat, where)
                     for raw, where in raw_records(self.spec.format, self.root, self.spec.split)]
            return [prompt_text(c, self.template) for c in convs]
        if self.spec.packing == "records" and self.spec.prompt is not None:
            return [p for p, _ in read_documents(self.spec, self.root)]
        raise DataError("responses are written to prompts: give a chat set (packing: chat) or records with a prompt "
                        "column (packing: records, prompt:)")

    def _chat_rows(self, root: Path) -> Rows:
        tok = self.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        if pad is None:
            raise DataError(f"the tokenizer at {tok.path} has neither a pad nor an EOS token to fill a row after "
                            "its conversation")
        convs = (conversation(raw, self.spec.chat, where) for raw, where in raw_records(self.spec.format, root,
                                                                                        self.spec.split))
        self.chat = chat_rows(convs, self.template, tok.encode, self.spec.chat, self.spec.length, pad, tok.eos_id)
        return Rows(self.chat.tokens, self.chat.mask, self.chat.text_bytes, self.chat.said)

    @property
    def length(self) -> int:
        return self.spec.length

    @property
    def positions(self) -> int:
        return int(self.rows.mask.sum())

    def __len__(self) -> int:
        return len(self.rows.tokens)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.rows.tokens[i]), torch.from_numpy(self.rows.mask[i])

    def get_batch(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(self.rows.tokens[rows]), torch.from_numpy(self.rows.mask[rows])

    def labels(self) -> np.ndarray:
        return np.full(len(self), -1, dtype=np.int64)

    def _hash_content(self, h) -> None:
        h.update(f"text:{self.tokenizer.fingerprint}:".encode())
        if self.template is not None:
            h.update(f"chat:{self.template.digest}:{self.spec.chat.turns}:".encode())
        for a in (self.rows.tokens, self.rows.mask):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())


class PromptSet(TransferSet):
    """The rows a responses job writes: each prompt of a text set ``n`` times (row r: prompt r // n, sample
    r % n), as its tokens followed by padding, no position with a loss yet. ``prompt_length[r]``: its tokens.
    Prompts with no room in a row for one written token are left out (``dropped``); ``kept``: the record each
    prompt is."""

    decodes = False

    def __init__(self, text: TextSet, n: int):
        self.text, self.spec, self.tokenizer, self.template, self.n = text, text.spec, text.tokenizer, text.template, n
        texts = text.prompts()
        ids = text.tokenizer.encode(texts)
        self.kept = [i for i, p in enumerate(ids) if 0 < len(p) <= text.length]
        self.prompts, self.dropped = len(self.kept), len(ids) - len(self.kept)
        if not self.kept:
            raise DataError(f"no prompt leaves room for a response in a row of {text.length + 1} tokens "
                            f"({len(ids)} prompts): give a longer length")
        if self.dropped:
            log.info("%d prompts leave no room for a response in a row of %d tokens: left out", self.dropped,
                     text.length + 1)
        tok = text.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        tokens = np.full((self.prompts, text.length + 1), 0 if pad is None else pad, dtype=np.int64)
        for row, i in enumerate(self.kept):
            tokens[row, :len(ids[i])] = ids[i]
        if int(tokens.max()) >= tok.vocab_size:
            raise DataError("the tokenizer produced ids beyond its own vocabulary size")
        self.prompt_length = np.repeat(np.array([len(ids[i]) for i in self.kept], dtype=np.int64), n)
        self.tokens = np.repeat(tokens, n, axis=0)
        text_bytes = sum(len(texts[i].encode()) for i in self.kept)
        self.rows = Rows(self.tokens, np.zeros((len(self.tokens), text.length), dtype=np.uint8), text_bytes)
        self.chat = ChatRows(self.rows.tokens, self.rows.mask, text_bytes, len(ids), dropped=self.dropped) \
            if self.template is not None else None

    @property
    def length(self) -> int:
        return self.text.length

    @property
    def positions(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return self.get_batch([i])

    def get_batch(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(self.tokens[rows]), torch.from_numpy(self.prompt_length[rows])

    def labels(self) -> np.ndarray:
        return np.full(len(self), -1, dtype=np.int64)

    def _hash_content(self, h) -> None:
        h.update(f"prompts:{self.tokenizer.fingerprint}:{self.n}:".encode())
        if self.template is not None:
            h.update(f"chat:{self.template.digest}:".encode())
        h.update(np.ascontiguousarray(self.tokens[::self.n]).tobytes())
        h.update(np.asarray(self.kept, dtype=np.int64).tobytes())
