"""Language-model teachers (darkstore/lm.py, darkstore/gpt.py): the sliced forward, transformers directories
loaded safely, and the tokenizer checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from darkstore.errors import CodeNotAllowedError, UnsafeWeightsError
from darkstore.gpt import GPT
from darkstore.lm import TokenizerMismatchError, describe_difference, load_lm
from darkstore.models import ModelSpec
from darkstore.text import load_tokenizer


def test_the_gpts_sliced_forward_is_its_forward():
    torch.manual_seed(0)
    m = GPT(50, block_size=16, n_layer=2, n_head=2, n_embd=16).eval()
    x = torch.randint(0, 50, (3, 12))
    h = m.hidden(x)
    torch.testing.assert_close(torch.cat([m.head(h[:, :5]), m.head(h[:, 5:])], 1), m(x))
    with pytest.raises(ValueError, match="longer than this GPT's block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_a_transformers_directory_loads_sliced_and_cut_to_the_tokenizer(lm_kit):
    b = lm_kit["members"][1]
    lm = load_lm(ModelSpec.model_validate({**b, "weights": str(lm_kit["root"] / b["weights"])}), vocab_size=512,
                 tokenizer=load_tokenizer(lm_kit["tokenizer"]))
    assert lm.kind == "transformers" and lm.vocab == 528 and lm.max_positions == 64
    x = torch.randint(0, 512, (2, 20))
    lm.check_split(x)
    assert lm.sliced, lm.notes
    with torch.inference_mode():
        torch.testing.assert_close(lm.logits(lm.hidden(x)), lm.module(input_ids=x).logits)


def test_pickled_weights_and_remote_code_are_refused(lm_kit, tmp_path):
    src = lm_kit["root"] / lm_kit["members"][1]["weights"]
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pickled weights .*pytorch_model.bin"):
        load_lm(ModelSpec(format="transformers", weights=str(pickled)), vocab_size=512)
    code = tmp_path / "code"
    shutil.copytree(src, code)
    cfg = json.loads((code / "config.json").read_text())
    (code / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    with pytest.raises(CodeNotAllowedError, match="--allow-code"):
        load_lm(ModelSpec(format="transformers", weights=str(code)), vocab_size=512)


def test_a_tokenizer_mismatch_says_what_differs(lm_kit, tmp_path):
    from darkstore_app.lmkit import train_tokenizer

    ours = load_tokenizer(lm_kit["tokenizer"])
    smaller = load_tokenizer(train_tokenizer(sorted(lm_kit["corpus"].glob("*.py")), tmp_path / "s", 400))
    assert describe_difference(smaller, ours) == "vocabularies of 400 and 512 tokens"
    spec = ModelSpec.model_validate({**lm_kit["members"][0], "weights": str(lm_kit["root"] / "gpt_a.safetensors"),
                                     "tokenizer": str(tmp_path / "s")})
    with pytest.raises(TokenizerMismatchError, match="another tokenizer than the transfer set's: vocabularies"):
        load_lm(spec, vocab_size=512, tokenizer=ours)
