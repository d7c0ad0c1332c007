"""Chat transfer sets: conversations rendered with the tokenizer's own chat template, one per row, a loss on
the assistant's turns.

A record holds a conversation as ``messages`` ({role, content}; roles system, user, assistant, tool; an
assistant's ``tool_calls`` and a record's ``tools`` pass through to the template), ShareGPT ``conversations``
({from, value}) or a ``prompt`` and a ``completion`` (each text or a list of messages). The template is the
tokenizer's (``chat_template`` in ``tokenizer_config.json``, or ``chat_template.jinja`` beside it) or a file
the spec names, rendered by ``transformers``' ``apply_chat_template``.

Which tokens are the assistant's: for assistant turn *i*, the conversation up to it is rendered with the
generation prompt (``before``) and up to and with it (``after``); its tokens are those between. Both texts must
be prefixes of the whole conversation's text, and their tokens prefixes of its tokens: otherwise the template
renders a turn differently inside the conversation than at the point where a model would write it, and the
masks would not match the tokens (refused, naming the record and turn).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .errors import DataError, SpecError

if TYPE_CHECKING:
    from .data import ChatSpec

ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT's speakers and the roles they are
SHAREGPT = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "tool": "tool", "observation": "tool", "function_response": "tool"}
#: the columns each format reads where the spec names none
COLUMNS = {"messages": "messages", "sharegpt": "conversations", "prompt_completion": "prompt"}


@dataclass
class Conversation:
    """One record's messages in the roles a chat template takes, and the tool definitions it offers."""

    messages: list[dict[str, Any]]
    where: str
    tools: list[Any] | None = None

    def assistant_turns(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]


# --- records to conversations ----------------------------------------------------------------------------
def conversation(raw: Any, spec: "ChatSpec", where: str) -> Conversation:
    """A record's conversation in the spec's format; one line naming the record where it is malformed."""
    if not isinstance(raw, dict):
        raise DataError(f"{where} is not a record (a JSON object)")
    fmt = spec.format if spec.format != "auto" else _detect(raw, spec.column, where)
    column = spec.column or COLUMNS[fmt]
    if fmt == "prompt_completion":
        messages = _prompt_completion(raw, column, where)
    else:
        turns = raw.get(column)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where} has no conversation in column {column!r}: a list of "
                            + ("{role, content} messages" if fmt == "messages" else "{from, value} turns"))
        messages = [(_message if fmt == "messages" else _sharegpt)(m, f"{where} turn {k}") for k, m in enumerate(turns)]
    tools = raw.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: tools is not a list of tool definitions")
    return Conversation(messages, where, tools or None)


def _detect(raw: dict[str, Any], column: str | None, where: str) -> str:
    if column is not None:
        value = raw.get(column)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
            return "sharegpt"
        return "messages"
    for fmt, col in COLUMNS.items():
        if col in raw:
            return fmt
    raise DataError(f"{where} holds no conversation: give it messages, conversations (ShareGPT) or prompt and "
                    f"completion (it has {', '.join(map(str, raw)) or 'no columns'})")


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict) or "role" not in m:
        raise DataError(f"{where} is not a message: give {{role, content}}")
    role = m["role"]
    if role not in ROLES:
        raise DataError(f"{where} has the unknown role {role!r}: roles are {', '.join(ROLES)}")
    content = m.get("content")
    if not isinstance(content, str) and not (role == "assistant" and content is None and m.get("tool_calls")):
        raise DataError(f"{where} ({role}) has no text content: content must be a string")
    return dict(m)


def _sharegpt(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict) or "from" not in m or not isinstance(m.get("value"), str):
        raise DataError(f"{where} is not a ShareGPT turn: give {{from, value}} with text")
    if m["from"] not in SHAREGPT:
        raise DataError(f"{where} has the unknown speaker {m['from']!r}: ShareGPT speakers are "
                        f"{', '.join(SHAREGPT)}")
    return {"role": SHAREGPT[m["from"]], "content": m["value"]}


def _prompt_completion(raw: dict[str, Any], column: str, where: str) -> list[dict[str, Any]]:
    out = []
    for col, role in ((column, "user"), ("completion", "assistant")):
        value = raw.get(col)
        if isinstance(value, str):
            out.append({"role": role, "content": value})
        elif isinstance(value, list) and value:
            out.extend(_message(m, f"{where} {col} {k}") for k, m in enumerate(value))
        elif col == column or value is not None:
            raise DataError(f"{where} has no {col} (text or a list of messages)")
    return out


# --- the template ----------------------------------------------------------------------------------------
@dataclass
class ChatTemplate:
    """A chat template with the tokenizer it renders for: ``render`` gives a conversation's text."""

    text: str
    source: str
    renderer: Any  # transformers.PreTrainedTokenizerFast

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def render(self, conv: Conversation, upto: int | None = None, *, generation_prompt: bool = False) -> str:
        messages = conv.messages if upto is None else conv.messages[:upto]
        try:
            out = self.renderer.apply_chat_template(messages, tools=conv.tools, tokenize=False,
                                                    add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 — jinja raises its own types, templates raise_exception
            raise DataError(f"{conv.where}: the chat template ({self.source}) refuses it: "
                            f"{type(exc).__name__}: {exc}") from None
        if not isinstance(out, str):
            raise DataError(f"the chat template ({self.source}) did not render text")
        return out


def load_template(tokenizer_path: str | Path, backend: Any, specials: dict[str, str],
                  template_file: Path | None) -> ChatTemplate:
    """The chat template ``template_file`` names, else the tokenizer's own, ready to render; one line where
    there is none."""
    folder = Path(tokenizer_path)
    folder = folder if folder.is_dir() else folder.parent
    if template_file is not None:
        if not template_file.is_file():
            raise DataError(f"chat template {str(template_file)!r} is not a file")
        text, source = template_file.read_text(), str(template_file)
    else:
        text, source = _own_template(folder)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as exc:
        raise SpecError("chat transfer sets render their template with transformers: pip install "
                        "'darkstore[lm]'") from exc
    renderer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=text, **specials)
    return ChatTemplate(text, source, renderer)


def _own_template(folder: Path) -> tuple[str, str]:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), str(jinja)
    config = folder / "tokenizer_config.json"
    raw = json.loads(config.read_text()) if config.is_file() else {}
    template = raw.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"the tokenizer at {folder} has no chat template (chat_template in tokenizer_config.json, "
                        "or chat_template.jinja): name a Jinja file with chat_template:")
    return template, str(config)


def prompt_text(conv: Conversation, template: ChatTemplate) -> str:
    """The text a model answers: the conversation without its closing assistant turn (if it ends with one),
    rendered with the generation prompt."""
    upto = len(conv.messages) - 1 if conv.messages[-1]["role"] == "assistant" else len(conv.messages)
    return template.render(conv, upto, generation_prompt=True)


# --- conversations to rows -------------------------------------------------------------------------------
@dataclass
class ChatRows:
    """Token rows of conversations, their loss masks and what did not fit."""

    tokens: np.ndarray  # [N, L + 1] int64
    mask: np.ndarray  # [N, L] uint8
    text_bytes: int
    conversations: int  # read
    truncated: int = 0
    dropped: int = 0
    kept: list[int] = field(default_factory=list)  # the conversation each row holds

    @property
    def said(self) -> str:
        parts = [f"{self.truncated} conversations truncated to the row"] * bool(self.truncated)
        parts += [f"{self.dropped} conversations dropped (no assistant token inside a row)"] * bool(self.dropped)
        return "; ".join(parts)


def assistant_spans(conv: Conversation, template: ChatTemplate, turns: str
                    ) -> tuple[str, list[tuple[int, str, str]]]:
    """The whole conversation's text and, per assistant turn with a loss, its message's index and the texts
    before and after it."""
    found = conv.assistant_turns()
    if not found:
        raise DataError(f"{conv.where} has no assistant turn: nothing in it would carry a loss")
    full = template.render(conv)
    spans = []
    for i in (found[-1:] if turns == "last" else found):
        before = template.render(conv, i, generation_prompt=True)
        after = template.render(conv, i + 1)
        for what, text in (("before", before), ("after", after)):
            if not full.startswith(text):
                raise DataError(f"{conv.where}: the chat template renders the conversation {what} message {i} "
                                "(assistant) differently than inside the whole conversation, so its loss mask "
                                "cannot be placed (a template that rewrites earlier turns: try turns: last)")
        spans.append((i, before, after))
    return full, spans


def conversation_tokens(conv: Conversation, template: ChatTemplate, encode, turns: str, eos: int | None = None
                        ) -> tuple[list[int], list[tuple[int, int]], int]:
    """A conversation's token ids, the [start, stop) token ranges of its assistant turns with a loss, and the
    UTF-8 bytes of its rendered text. A turn ends at its last ``eos`` (what a model writes to end it): what the
    template puts after that (a newline) carries no loss."""
    full, spans = assistant_spans(conv, template, turns)
    texts = [full, *(t for _, before, after in spans for t in (before, after))]
    ids, *prefixes = encode(texts)
    ranges = []
    for (i, _, _), a, b in zip(spans, prefixes[0::2], prefixes[1::2]):
        for p in (a, b):
            if ids[:len(p)] != p:
                at = next(j for j, (x, y) in enumerate(zip(ids, p)) if x != y) if len(p) <= len(ids) else len(ids)
                raise DataError(f"{conv.where}: the chat template's text around message {i} (assistant) splits into "
                                f"other tokens than the whole conversation does (from token {at}): its loss mask "
                                "would not match the tokens")
        stop = len(b)
        if eos is not None and eos in ids[len(a):stop]:
            stop = len(ids[:stop]) - ids[:stop][::-1].index(eos)
        ranges.append((len(a), stop))
    return ids, ranges, len(full.encode())


def chat_rows(convs: Iterable[Conversation], template: ChatTemplate, encode, spec: "ChatSpec", length: int,
              pad: int, eos: int | None) -> ChatRows:
    """One row per conversation: its tokens cut to ``length + 1`` (or the conversation dropped, by
    ``spec.overflow``) and padded with ``pad``; position t carries a loss where token t + 1 is an assistant's
    (up to the ``eos`` ending its turn: :func:`conversation_tokens`)."""
    toks, masks, kept = [], [], []
    out = ChatRows(np.empty(0), np.empty(0), 0, 0)
    for n, conv in enumerate(convs):
        out.conversations += 1
        ids, ranges, nbytes = conversation_tokens(conv, template, encode, spec.turns, eos)
        if len(ids) > length + 1:
            if spec.overflow == "drop":
                out.dropped += 1
                continue
            out.truncated += 1
            ids = ids[:length + 1]
        target = np.zeros(length, dtype=np.uint8)
        for a, b in ranges:
            target[max(a - 1, 0):min(b, len(ids)) - 1] = 1
        if not target.any():
            out.dropped += 1
            continue
        toks.append(ids + [pad] * (length + 1 - len(ids)))
        masks.append(target)
        kept.append(n)
        out.text_bytes += nbytes
    if not toks:
        raise DataError(f"no conversation leaves an assistant token inside a row of {length + 1} tokens "
                        f"({out.conversations} read): give a longer length")
    out.tokens, out.mask, out.kept = np.asarray(toks, dtype=np.int64), np.stack(masks), kept
    return out
