"""interop.vllm: captures of a real vLLM server's prompt log-probabilities (the engine tests' shared server), kept
as users keep them (the server's answers, and RequestOutput-like records), imported and checked against the same
model run through transformers in float64."""

from __future__ import annotations

import json
import subprocess

import httpx
import numpy as np
import pytest
import torch

from interop import import_capture
from storage import open_store
from storage.forms import form_of

from .conftest import DARKSTORE, cli_env
from .engines import SERVED, float64_reference

K, ROWS, LENGTH = 8, 3, 24


@pytest.fixture(scope="module")
def captured(vllm, tmp_path_factory):
    """Three prompts of the json package's text asked of the server with prompt_logprobs K and their ids back;
    the answer saved as it came (server.jsonl) and as offline RequestOutput records (offline.jsonl)."""
    from darkstore.text import load_tokenizer
    from darkstore_app.lmkit import stdlib

    tmp = tmp_path_factory.mktemp("capture")
    tok = load_tokenizer(vllm.tokenizer)
    ids = tok.encode([(stdlib() / "json" / "decoder.py").read_text()])[0]
    prompts = [ids[i * 100:i * 100 + LENGTH + 1] for i in range(ROWS)]
    r = httpx.post(vllm.proc.url + "/v1/completions", timeout=120,
                   json={"model": SERVED, "prompt": prompts, "max_tokens": 1, "temperature": 0,
                         "prompt_logprobs": K, "return_token_ids": True})
    assert r.status_code == 200, r.text
    answer = r.json()
    (tmp / "server.jsonl").write_text(json.dumps(answer) + "\n")
    records = [{"prompt_token_ids": c["prompt_token_ids"], "prompt_logprobs": c["prompt_logprobs"]}
               for c in sorted(answer["choices"], key=lambda c: c["index"])]
    (tmp / "offline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"dir": tmp, "prompts": np.array(prompts)}


def test_a_servers_capture_imports_as_transformers_computes_it(vllm, captured, tmp_path):
    report = import_capture("vllm", captured["dir"] / "server.jsonl", tmp_path / "s.zarr", vllm.tokenizer)
    assert (report.rows, report.k, report.length, report.positions) == (ROWS, K, LENGTH, ROWS * LENGTH)
    r = open_store(report.store)
    got = r.read_chunks(r.finished_chunks(), ["tokens", "loss_mask", "topk_logits", "topk_index", "tail_lse"])
    assert (got["tokens"] == captured["prompts"]).all() and got["loss_mask"].all()
    parts = {n: torch.from_numpy(got[n].astype(np.int64) if got[n].dtype == np.uint16 else got[n])
             for n in ("topk_logits", "topk_index", "tail_lse")}
    ids, logp, tail = (t.numpy() for t in form_of(r.meta).top_logprobs(parts, r.meta, None))
    lp = float64_reference(vllm.model, captured["prompts"])
    kth = -np.sort(-lp, -1)[..., K - 1]
    ref = np.take_along_axis(lp, ids, -1)
    assert np.abs(ref - logp).max() < 1e-3 and (ref.min(-1) >= kth - 1e-3).all()
    assert np.abs(np.log1p(-np.exp(ref).sum(-1)) - tail).max() < 1e-3
    y = captured["prompts"][:, 1:]
    nll = -np.take_along_axis(lp, y[..., None], -1)[..., 0]
    assert r.perplexity()["ensemble"] == pytest.approx(np.exp(nll.mean()), rel=1e-3), "the actual tokens' values"
    assert r.meta.engine.values == "logprobs" and r.meta.engine.members[0].engine == "vllm capture"


def test_offline_records_import_as_the_server_answer_does(vllm, captured, tmp_path):
    a = import_capture("vllm", captured["dir"] / "server.jsonl", tmp_path / "a.zarr", vllm.tokenizer)
    done = subprocess.run([*DARKSTORE, "targets", "import", str(captured["dir"] / "offline.jsonl"), "-f", "vllm",
                           "--tokenizer", str(vllm.tokenizer), "--out", str(tmp_path / "b.zarr")],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    ra, rb = open_store(a.store), open_store(tmp_path / "b.zarr")
    for name in ("tokens", "loss_mask", "topk_logits", "topk_index", "tail_lse", "nll"):
        np.testing.assert_array_equal(ra.group[name][:], rb.group[name][:], err_msg=name)
