"""Language-model generation (teacher_service/kinds/tokens.py): per-token stores through the CLI checked against a
float64 recomputation of the members' combined distribution, a killed capture resumed, and each bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from darkstore.lm import load_lm
from darkstore.models import ModelSpec
from storage import open_store
from storage.fields import row_fields
from storage.forms.topk import TopK
from student_trainer.kinds import student_kind
from teacher_service.generate import generate as run
from teacher_service.spec import JobSpec

from .conftest import DARKSTORE, cli_env
from .procs import kill_generation_midway, one_error

V = 512


def generate(job: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DARKSTORE, "generate", "--job", str(job), "--out", str(out), *extra], env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def member_logits64(job: Path, tokens: np.ndarray) -> torch.Tensor:
    """[M, N, L, V] each member's logits in float64 at the stored rows, vocabulary padding cut."""
    spec = yaml.safe_load(job.read_text())
    out = []
    for m in spec["teachers"]["members"]:
        lm = load_lm(ModelSpec.model_validate(m), vocab_size=V)
        lm.module.double().eval()
        with torch.inference_mode():
            out.append(lm.module(torch.from_numpy(tokens[:, :-1]).long())
                       if lm.kind == "gpt" else lm.module(input_ids=torch.from_numpy(tokens[:, :-1]).long()).logits)
    return torch.stack([z[..., :V].double() for z in out])


def _like(arrays: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Another job's rows (its own shuffled order) in the order of ``ref``'s, matched by sequence."""
    order = np.argsort(arrays["index"])[np.argsort(np.argsort(ref["index"]))]
    return {k: v[order] for k, v in arrays.items()}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    r = open_store(path)
    return r.read_chunks(r.finished_chunks(), [f.name for f in row_fields(r.meta)])


def test_topk_and_sampled_stores_match_a_float64_recomputation(lm_kit, tmp_path):
    job = lm_kit["job"](tmp_path / "job.yaml", targets="topk:8", chunk_rows=128)
    done = generate(job, tmp_path / "topk")
    assert done.returncode == 0, done.stderr
    assert "store complete" in done.stdout and "tokens" in done.stderr
    r = open_store(tmp_path / "topk")
    r.verify()
    m = r.meta
    assert m.sequence.length == 32 and m.num_classes == V and m.sequence.tokenizer.vocab_size == V
    got = _arrays(tmp_path / "topk")
    tokens = got["tokens"].astype(np.int64)
    assert got["topk_index"].dtype == np.uint16 and got["topk_logits"].dtype == np.uint8
    assert got["topk_logits"].shape == (m.num_rows, 32, 8) and m.targets.step == 1 / 16
    z = member_logits64(job, tokens)
    ell = z.mean(0)
    ell = ell - ell.amax(-1, keepdim=True)  # the geometric mean, centred, in float64
    idx = torch.from_numpy(got["topk_index"].astype(np.int64))
    assert (idx.diff(dim=-1) > 0).all()  # each position's tokens ascending, none twice
    exact_at = ell.gather(-1, idx)
    head = TopK.head({"topk_logits": torch.from_numpy(got["topk_logits"])}, m).double()
    assert (head - exact_at).abs().max() <= m.targets.step / 2 + 1e-6  # quantised: off by at most half a step
    kth = ell.topk(9, dim=-1).values  # the stored head is the top 8, up to float32 near-ties
    assert (exact_at.min(-1).values >= kth[..., 8] - 1e-5).all()
    rest = ell.scatter(-1, idx, float("-inf")).logsumexp(-1)
    np.testing.assert_allclose(got["tail_lse"], rest.numpy(), atol=1e-4)
    exact = torch.cat([exact_at, rest[..., None]], -1).log_softmax(-1)  # the exact top-k and its tail bucket
    stored = torch.cat([head, torch.from_numpy(got["tail_lse"]).double()[..., None]], -1).log_softmax(-1)
    assert float((exact.exp() * (exact - stored)).sum(-1).mean()) < 1e-3  # nats per token lost to quantisation
    y = torch.from_numpy(tokens[:, 1:])
    nll64 = -torch.log_softmax(ell, -1).gather(-1, y[..., None]).sum()
    assert float(r.group["nll"][:][:, 0].sum()) == pytest.approx(float(nll64), rel=1e-5)
    assert r.perplexity()["ensemble"] == pytest.approx(float(torch.exp(nll64 / y.numel())), rel=1e-5)
    # the heads fuse: each teacher's own statistics at position p of store row r where (p - r) % stride == 0
    stride = m.sequence.teacher_stride
    sampled = torch.from_numpy((np.arange(32)[None] - np.arange(m.num_rows)[:, None]) % stride == 0)
    assert stride > 1 and int(r.group["teacher_positions"][:].sum()) == int(sampled.sum())
    own = -torch.log_softmax(z, -1).gather(-1, y[None, ..., None].expand(len(z), -1, -1, 1))[..., 0]
    np.testing.assert_allclose(r.group["nll"][:][:, 1:].sum(0), (own * sampled).sum((1, 2)).numpy(), rtol=1e-5)
    hits = ((z.argmax(-1) == y[None]) & sampled).sum((1, 2)).numpy()
    assert np.abs(r.group["stats"][:][:, 2:].sum(0) - hits).max() <= 1  # float32 near-ties aside

    # its students read their inputs from the store: the token kind opens no transfer set for them
    assert student_kind(m).open_data(r, None, allow_code=False, roots=None, fingerprints=None) is None

    # the other forms in-process (the CLI path is the same): arithmetic sampled, and dense
    run(JobSpec.from_file(lm_kit["job"](tmp_path / "sampled.yaml", targets="sampled:16", chunk_rows=128,
                                        combine="arithmetic")), tmp_path / "sampled")
    s = _like(_arrays(tmp_path / "sampled"), got)
    np.testing.assert_array_equal(s["tokens"], got["tokens"])
    assert s["sample_index"].shape == (m.num_rows, 32, 16)
    p = torch.softmax(z, -1).mean(0)  # the arithmetic mean at T = 1, float64
    counts = np.zeros((m.num_rows, 32, V))
    np.put_along_axis(counts, s["sample_index"].astype(np.int64), 1, axis=-1)
    drawn = p.gather(-1, torch.from_numpy(s["sample_index"].astype(np.int64)))
    assert (drawn > 0).all()
    freq = np.stack([np.bincount(row, minlength=V) for row in s["sample_index"].reshape(-1, 16)]).reshape(p.shape)
    err = (freq / 16 - p.numpy()).sum(axis=(0, 1)) / (m.num_rows * 32)  # unbiased: mean frequency → mean p
    assert np.abs(err).max() < 5 * np.sqrt(p.numpy().mean((0, 1)).max() / (m.num_rows * 32 * 16)) + 1e-4

    run(JobSpec.from_file(lm_kit["job"](tmp_path / "dense.yaml", targets="dense", chunk_rows=128)), tmp_path / "dense")
    d = _like(_arrays(tmp_path / "dense"), got)
    assert d["logits"].shape == (m.num_rows, 32, V) and d["logits"].dtype == np.float16
    np.testing.assert_allclose(d["logits"].astype(np.float64), ell.numpy(), atol=1e-2, rtol=1e-3)


def test_a_killed_capture_resumes_to_the_same_bytes(lm_kit, tmp_path):
    builtin = [lm_kit["members"][0], lm_kit["members"][2]]  # no transformers import: three processes start faster
    job = lm_kit["job"](tmp_path / "job.yaml", members_=builtin, targets="topk:8", chunk_rows=8)
    args = ["generate", "--job", str(job), "--batch-size", "2"]
    killed = tmp_path / "killed"
    kill_generation_midway(args, killed)
    resumed = subprocess.run([*DARKSTORE, *args, "--out", str(killed)], env=cli_env(), capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    clean = subprocess.run([*DARKSTORE, *args, "--out", str(tmp_path / "clean")], env=cli_env(), capture_output=True,
                           text=True)
    assert clean.returncode == 0, clean.stderr
    a, b = _arrays(killed), _arrays(tmp_path / "clean")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra, rb = open_store(killed), open_store(tmp_path / "clean")
    for name in ("nll", "stats", "teacher_positions"):
        np.testing.assert_array_equal(ra.group[name][:], rb.group[name][:], err_msg=name)

    # two shards (as two machines would run them, one after the other here) fill one store with the same bytes
    from teacher_service.generate import Shard

    spec = JobSpec.from_file(job)
    for i in (0, 1):
        run(spec, tmp_path / "sharded", shard=Shard(i, 2), batch_size=2)
    assert open_store(tmp_path / "sharded").complete
    c = _arrays(tmp_path / "sharded")
    for k in b:
        np.testing.assert_array_equal(c[k], b[k], err_msg=k)


def test_bad_language_model_inputs_get_one_clear_error_and_write_nothing(lm_kit, tmp_path):
    """A mismatched tokenizer through the CLI (one `error:` line), then each other bad input in-process (the
    CLI prints every DarkstoreError alike): the error names the problem and nothing is written."""
    from darkstore.errors import DarkstoreError
    from darkstore_app.lmkit import gpt_teacher, train_tokenizer

    kit, out = lm_kit, tmp_path / "store"
    other = train_tokenizer(sorted((kit["corpus"].parent / "http").glob("*.py")), tmp_path / "other", 512)
    member = {**kit["members"][0], "tokenizer": str(other)}
    one_error(generate(kit["job"](tmp_path / "a.yaml", members_=[member, kit["members"][1]]), out),
               out, "was made with another tokenizer")

    small = gpt_teacher(kit["root"] / "small.safetensors", 300, seed=0, block_size=64, n_layer=1, n_head=2, n_embd=32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_bytes(bytes(range(256)))
    for options, says in [
        ({"members_": [small]}, "predicts 300 tokens but the tokenizer has 512"),
        ({"data": {"length": 100}}, "takes at most 64 positions"),
        ({"data": {"root": str(tmp_path / "empty"), "glob": "*.txt"}}, "the text corpus is empty"),
        ({"data": {"root": str(tmp_path / "bin"), "glob": "*.txt"}}, "is not text"),
        ({"data": {"glob": "nothing*.py"}}, "no files match"),
        ({"targets": "topk:512"}, "keeps every one of the 512 tokens"),
        ({"members_": [kit["members"][0], _nan_head(kit["members"][2], kit["root"], tmp_path)]},
         "teacher 'gpt_nan' produced NaN/Inf logits at position 0 of sequence"),
    ]:
        with pytest.raises(DarkstoreError, match=says):
            run(JobSpec.from_file(kit["job"](tmp_path / "job.yaml", **options)), out)
        if "NaN" in says:  # found while computing: the store exists, no chunk of it is committed
            assert not open_store(out, allow_incomplete=True).finished_chunks()
            shutil.rmtree(out)
        assert not out.exists(), f"nothing may be written ({says})"


def _nan_head(member: dict, root: Path, tmp_path: Path) -> dict:
    """A copy of a built-in GPT teacher whose head gives one token a NaN logit everywhere."""
    from safetensors.torch import load_file, save_file

    weights = load_file(root / member["weights"])
    weights["lm_head.weight"][7] = float("nan")
    save_file(weights, tmp_path / "nan.safetensors")
    return {**member, "name": "gpt_nan", "weights": str(tmp_path / "nan.safetensors")}
