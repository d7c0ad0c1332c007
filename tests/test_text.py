"""Text transfer sets (darkstore/text.py): packing, records and their loss mask, tokenizers from local files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from darkstore.data import TextSpec
from darkstore.transfer import open_transfer_set
from darkstore.errors import DataError, SpecError
from darkstore.text import load_tokenizer, pack, records


def test_packing_cuts_the_eos_joined_stream_into_rows_sharing_one_token():
    rows = pack([[1, 2, 3], [4, 5]], length=2, eos=0)
    # stream 1 2 3 0 4 5 0: rows of 3 tokens starting every 2
    np.testing.assert_array_equal(rows, [[1, 2, 3], [3, 0, 4], [4, 5, 0]])
    with pytest.raises(DataError, match="fewer than one row"):
        pack([[1]], length=5, eos=0)


def test_records_mask_the_prompt_and_the_padding():
    tokens, mask, truncated, empty = records([[7, 8], [], [9] * 6], [[1, 2], [3], [4]], length=4, eos=0, pad=99)
    np.testing.assert_array_equal(tokens[0], [7, 8, 1, 2, 0])
    np.testing.assert_array_equal(mask[0], [0, 1, 1, 1])  # position t predicts token t+1: 1, 2, EOS
    np.testing.assert_array_equal(tokens[1], [3, 0, 99, 99, 99])
    np.testing.assert_array_equal(mask[1], [1, 0, 0, 0])  # EOS after the response; padding carries no loss
    assert (truncated, empty) == (1, 1) and len(tokens) == 2  # a prompt filling the row leaves no loss: left out


def test_jsonl_records_through_a_data_spec(lm_kit, tmp_path):
    lines = [{"q": "def f(x):", "a": " return x\n"}, {"q": "import json", "a": "\njson.dumps({})\n"}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    spec = TextSpec(root=str(tmp_path / "qa.jsonl"), format="jsonl", field="a", prompt="q",
                    tokenizer=str(lm_kit["tokenizer"]), length=16, packing="records")
    data = open_transfer_set(spec)
    tokens, mask = data.get_batch(np.arange(2))
    tok = data.tokenizer
    p, r = tok.encode([lines[0]["q"], lines[0]["a"]])
    assert tokens[0, :len(p) + len(r)].tolist() == p + r and int(tokens[0, len(p) + len(r)]) == tok.eos_id
    assert mask[0].tolist() == [0] * (len(p) - 1) + [1] * (len(r) + 1) + [0] * (16 - len(p) - len(r))
    with pytest.raises(DataError, match="line 1 has no prompt column 'question'"):
        open_transfer_set(spec.model_copy(update={"prompt": "question"}))
    with pytest.raises(ValueError, match="packing: records"):
        TextSpec(root="x", format="jsonl", prompt="q", tokenizer="t", length=4)


def test_a_tokenizers_fingerprint_follows_its_content_not_its_path(lm_kit, tmp_path):
    a = load_tokenizer(lm_kit["tokenizer"])
    shutil.copytree(lm_kit["tokenizer"], tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").fingerprint == a.fingerprint
    assert load_tokenizer(tmp_path / "copy" / "tokenizer.json").eos_id == a.eos_id == 0
    (tmp_path / "copy" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "pad_token": "a"}')
    assert load_tokenizer(tmp_path / "copy").fingerprint != a.fingerprint  # special tokens are part of it
    (tmp_path / "copy" / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
    with pytest.raises(DataError, match="names the special token '<nope>', which its vocabulary lacks"):
        load_tokenizer(tmp_path / "copy")
    (tmp_path / "empty").mkdir()
    with pytest.raises((DataError, SpecError), match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_a_saved_hugging_face_dataset_and_a_transformers_tokenizer_folder(lm_kit, tmp_path):
    import datasets

    texts = [p.read_text() for p in sorted(lm_kit["corpus"].glob("*.py"))[:2]]
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "ds"))
    ours = load_tokenizer(lm_kit["tokenizer"])
    (tmp_path / "hf").mkdir()
    ours.tokenizer.model.save(str(tmp_path / "hf"))  # vocab.json and merges.txt: a folder only transformers reads
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"}))
    other = load_tokenizer(tmp_path / "hf")
    assert other.eos_id == ours.eos_id and other.encode(texts[:1]) == ours.encode(texts[:1])
    data = open_transfer_set(TextSpec(root=str(tmp_path / "ds"), format="huggingface", field="content",
                                      tokenizer=str(lm_kit["tokenizer"]), length=16))
    ids = ours.encode(texts)
    stream = [t for doc in ids for t in (*doc, ours.eos_id)]
    assert len(data) == (len(stream) - 1) // 16
    assert data.get_batch([1])[0][0].tolist() == stream[16:33]
