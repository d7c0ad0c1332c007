"""Chat transfer sets (darkstore/chat.py): conversations in three formats rendered with the tokenizer's chat
template, a loss on the assistant's turns only, what does not fit counted, the template in the fingerprint and
the store, and each bad input refused in one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from darkstore.errors import DataError
from darkstore.transfer import open_transfer_set
from darkstore_app.lmkit import CHATML, chat_tokenizer, gpt_teacher
from storage import open_store

from .conftest import DARKSTORE, LM_CONFIG, cli_env

TALK = {"messages": [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "Serialises an object."},
    {"role": "tool", "content": "{\"ok\": true}"},
    {"role": "user", "content": "And loads?"},
    {"role": "assistant", "content": "Parses JSON text."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
PAIR = {"prompt": "Say hi", "completion": "hi there"}


@pytest.fixture(scope="module")
def chat_tok(lm_kit, tmp_path_factory) -> Path:
    return chat_tokenizer(lm_kit["tokenizer"], tmp_path_factory.mktemp("chat") / "tok")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def open_chat(path: Path, tok: Path, length: int = 128, **options):
    data = {"kind": "text", "root": str(path), "format": "jsonl", "tokenizer": str(tok), "length": length,
            "packing": "chat", **options}
    return open_transfer_set(data)


def trained_text(ds, row: int) -> list[str]:
    """The text of each run of labels with a loss in ``row``, decoded."""
    tokens, mask = (a[0].numpy() for a in ds.get_batch([row]))
    labels, runs, cur = tokens[1:], [], []
    for t, on in enumerate(mask):
        if on:
            cur.append(int(labels[t]))
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] * bool(cur)
    return [ds.tokenizer.tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def test_each_format_carries_a_loss_on_the_assistants_turns_up_to_their_end(chat_tok, tmp_path):
    ds = open_chat(write_jsonl(tmp_path / "c.jsonl", [TALK, SHAREGPT, PAIR]), chat_tok)
    assert len(ds) == 3
    assert trained_text(ds, 0) == ["Serialises an object.<|im_end|>", "Parses JSON text.<|im_end|>"]
    assert trained_text(ds, 1) == ["4<|im_end|>"]
    assert trained_text(ds, 2) == ["hi there<|im_end|>"]
    tokens = ds.get_batch([0])[0][0].tolist()
    text = ds.tokenizer.tokenizer.decode(tokens, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>tool\n{\"ok\": true}<|im_end|>" in text  # the tool's turn is rendered, without a loss
    row = ds.tokenizer.tokenizer.decode(ds.get_batch([1])[0][0].tolist(), skip_special_tokens=False)
    assert row.rstrip("<|endoftext|>") == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


def test_the_last_turn_alone_and_a_saved_dataset(chat_tok, tmp_path):
    import datasets

    ds = open_chat(write_jsonl(tmp_path / "c.jsonl", [TALK]), chat_tok, chat={"turns": "last"})
    assert trained_text(ds, 0) == ["Parses JSON text.<|im_end|>"]
    datasets.Dataset.from_dict({"chat": [TALK["messages"]]}).save_to_disk(str(tmp_path / "ds"))
    hf = open_transfer_set({"kind": "text", "root": str(tmp_path / "ds"), "format": "huggingface",
                            "tokenizer": str(chat_tok), "length": 128, "packing": "chat",
                            "chat": {"format": "messages", "column": "chat"}})
    assert hf.get_batch([0])[0].tolist() == open_chat(tmp_path / "c.jsonl", chat_tok).get_batch([0])[0].tolist()


def test_what_does_not_fit_is_cut_or_dropped_and_counted(chat_tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [TALK, SHAREGPT, PAIR])
    whole = open_chat(path, chat_tok).chat.tokens
    n0 = int((whole[0] != whole[0][-1]).nonzero()[0][-1]) + 1  # the first conversation's tokens
    cut = open_chat(path, chat_tok, length=n0 - 4)
    assert (cut.chat.conversations, cut.chat.truncated, cut.chat.dropped, len(cut)) == (3, 1, 0, 3)
    assert cut.get_batch([0])[0][0].tolist() == whole[0][:n0 - 3].tolist()
    assert trained_text(cut, 0)[0] == "Serialises an object.<|im_end|>"
    dropped = open_chat(path, chat_tok, length=n0 - 4, chat={"overflow": "drop"})
    assert (dropped.chat.truncated, dropped.chat.dropped, dropped.chat.kept) == (0, 1, [1, 2])
    assert dropped.get_batch([0])[0][0].tolist() == whole[1][:n0 - 3].tolist()
    first = [int(m.nonzero()[0][0]) for m in open_chat(path, chat_tok).chat.mask]  # each row's first loss
    short = open_chat(path, chat_tok, length=min(first[1:]) + 1)  # the talk's first answer lies beyond it
    assert short.chat.dropped == 3 - len(short) and 0 not in short.chat.kept and len(short) >= 1
    with pytest.raises(DataError, match="no conversation leaves an assistant token inside a row of"):
        open_chat(path, chat_tok, length=min(first))


def test_the_template_is_part_of_the_fingerprint_and_a_named_file_replaces_it(chat_tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [TALK, PAIR])
    own = open_chat(path, chat_tok)
    same = tmp_path / "same.jinja"
    same.write_text(CHATML)
    assert open_chat(path, chat_tok, chat_template=str(same)).fingerprint == own.fingerprint
    other = tmp_path / "other.jinja"
    other.write_text(CHATML.replace("{% for message", "{{ '<|im_start|>system\\nYou help.<|im_end|>\\n' }}"
                                                       "{% for message", 1))
    theirs = open_chat(path, chat_tok, chat_template=str(other))
    assert theirs.fingerprint != own.fingerprint and theirs.template.source == str(other)
    assert trained_text(theirs, 1) == trained_text(own, 1)
    last = open_chat(path, chat_tok, chat={"turns": "last"})
    assert last.fingerprint != own.fingerprint  # same tokens, other masks


@pytest.mark.parametrize("records, template, match", [
    ([{"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}], None,
     r"line 1 turn 0 has the unknown role 'narrator'"),
    ([{"conversations": [{"from": "bot", "value": "y"}]}], None, r"unknown speaker 'bot'"),
    ([PAIR, {"messages": [{"role": "user", "content": "hi"}]}], None, r"line 2 has no assistant turn"),
    ([{"text": "hi"}], None, r"line 1 holds no conversation"),
    ([{"messages": [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "y"}]}], None,
     r"has no text content"),
    ([{"prompt": "Go", "completion": "return self"}],
     "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
     r"line 1: the chat template's text around message 1 \(assistant\) splits into other tokens"),
    ([TALK], "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + '\\n' + "
             "m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}",
     r"line 1: the chat template renders the conversation before message 2 \(assistant\) differently"),
    ([PAIR], "{{ raise_exception('roles must alternate') }}", r"line 1: the chat template .* refuses it: .*alternate"),
])
def test_each_bad_conversation_or_template_is_refused_in_one_line(chat_tok, tmp_path, records, template, match):
    path = write_jsonl(tmp_path / "c.jsonl", records)
    options = {}
    if template is not None:
        (tmp_path / "t.jinja").write_text(template)
        options["chat_template"] = str(tmp_path / "t.jinja")
    with pytest.raises(DataError, match=match) as info:
        open_chat(path, chat_tok, **options)
    assert "\n" not in str(info.value)


def test_a_tokenizer_without_a_template_is_refused(lm_kit, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [PAIR])
    with pytest.raises(DataError, match="has no chat template .* name a Jinja file with chat_template:"):
        open_chat(path, lm_kit["tokenizer"])


def test_a_chat_store_keeps_its_template_and_counts(chat_tok, tmp_path):
    """Through the CLI: the store's sequence record holds the template and what did not fit, and its rows the
    set's tokens and masks."""
    vocab = 514  # the base tokenizer's 512 and ChatML's two
    member = gpt_teacher(tmp_path / "t.safetensors", vocab, seed=0, **LM_CONFIG)
    path = write_jsonl(tmp_path / "c.jsonl", [TALK, SHAREGPT, PAIR] * 3)
    data = {"kind": "text", "root": str(path), "format": "jsonl", "tokenizer": str(chat_tok), "length": 40,
            "packing": "chat"}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"teachers": {"members": [dict(member, weights=str(tmp_path / member["weights"]))]},
                                   "targets": "topk:4", "data": data}))
    got = subprocess.run([*DARKSTORE, "generate", "--job", str(job), "--out", str(tmp_path / "s")], env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    r = open_store(tmp_path / "s")
    seq = r.meta.sequence
    assert seq.packing == "chat" and seq.chat.template == CHATML and seq.chat.turns == "all"
    assert (seq.chat.conversations, seq.chat.truncated) == (9, 3)
    ds = open_transfer_set(data)
    fields = r.read_chunks(r.finished_chunks(), ["tokens", "loss_mask", "index"])
    order = np.argsort(fields["index"])
    tokens, mask = (a.numpy() for a in ds.get_batch(np.arange(len(ds))))
    assert np.array_equal(fields["tokens"][order], tokens) and np.array_equal(fields["loss_mask"][order], mask)
    assert seq.positions == int(mask.sum())
    shown = subprocess.run([*DARKSTORE, "inspect", str(tmp_path / "s")], env=cli_env(), capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "3 truncated" in shown.stdout and "every assistant turn" in shown.stdout
    assert "⟦" in shown.stdout and "ended by" not in shown.stdout
