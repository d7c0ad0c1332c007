"""Responses written by the teachers (teacher_service/kinds/responses.py): written tokens drawn from the
ensemble's combined distribution and their targets checked against a float64 teacher-forced recomputation,
finish reasons, a killed job resumed and two shards to the same bytes, and each bad input in one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from darkstore.lm import load_lm
from darkstore.models import ModelSpec
from darkstore.text import load_tokenizer
from storage import open_store
from storage.fields import row_fields
from storage.forms.topk import TopK
from teacher_service.generate import Shard
from teacher_service.generate import generate as run
from teacher_service.spec import JobSpec

from .conftest import DARKSTORE, cli_env
from .procs import kill_generation_midway, one_error

V = 514  # the base tokenizer's 512 and ChatML's two
LENGTH = 40


@pytest.fixture
def kit(chat_kit) -> dict:
    return chat_kit


def arrays(path: Path) -> dict[str, np.ndarray]:
    r = open_store(path)
    return r.read_chunks(r.finished_chunks(), [f.name for f in row_fields(r.meta)])


def member_logits64(job: Path, tokens: np.ndarray) -> torch.Tensor:
    """[M, N, L, V] each member's logits in float64 over the stored rows, teacher-forced (no cache)."""
    out = []
    for m in yaml.safe_load(job.read_text())["teachers"]["members"]:
        lm = load_lm(ModelSpec.model_validate(m), vocab_size=V)
        lm.module.double().eval()
        x = torch.from_numpy(tokens[:, :-1]).long()
        with torch.inference_mode():
            out.append(lm.module(x) if lm.kind == "gpt" else lm.module(input_ids=x).logits)
    return torch.stack([z[..., :V].double() for z in out])


def written(got: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's prompt length and count of written tokens, after checking the mask is one run from the
    prompt's last position."""
    mask = got["loss_mask"].astype(bool)
    count = mask.sum(1)
    first = mask.argmax(1)
    assert (count > 0).all()
    assert (mask == ((np.arange(LENGTH)[None] >= first[:, None]) & (np.arange(LENGTH)[None] < (first + count)[:, None]))).all()
    return first + 1, count


def test_written_tokens_and_their_targets_match_a_float64_recomputation(kit, tmp_path):
    job = kit["job"](tmp_path / "job.yaml", responses={"max_new_tokens": 16, "n": 2, "top_p": 0.9, "seed": 5})
    done = subprocess.run([*DARKSTORE, "generate", "--job", str(job), "--out", str(tmp_path / "s")], env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "24 of 24 responses (100 %)" in done.stderr and "tokens written" in done.stderr
    r = open_store(tmp_path / "s")
    r.verify()
    m = r.meta
    assert m.num_rows == 24 and m.sequence.responses.prompts == 12 and m.sequence.responses.n == 2
    got = arrays(tmp_path / "s")
    tokens = got["tokens"].astype(np.int64)
    plen, count = written(got)
    keep = torch.from_numpy(got["loss_mask"].astype(bool))

    # the rows' prompts are the set's prompts, rendered with the generation prompt; each answered twice
    tok = load_tokenizer(kit["tokenizer"]).tokenizer
    for row in range(m.num_rows):
        prompt = tok.decode(tokens[row, :plen[row]].tolist(), skip_special_tokens=False)
        i = int(got["index"][row]) // 2
        assert prompt == f"<|im_start|>user\nWhat is {i} + {i % 3}?<|im_end|>\n<|im_start|>assistant\n"
    pairs = np.argsort(got["index"]).reshape(12, 2)
    assert (tokens[pairs[:, 0]] != tokens[pairs[:, 1]]).any(1).sum() >= 10  # two samples, mostly different

    # why each ended: EOS as its last token, else the budget of 16 tokens (no stop strings here)
    finish = got["finish"]
    last = tokens[np.arange(m.num_rows), plen + count - 1]
    assert set(np.unique(finish)) <= {1, 3} and (finish == 1).any() and (finish == 3).any()
    assert ((last == kit["eos"]) == (finish == 1)).all()
    assert (count[finish == 3] == 16).all()

    # targets: the geometric mean of the members' logits at each written position, as in a scored store
    z = member_logits64(job, tokens)
    ell = z.mean(0)
    ell = ell - ell.amax(-1, keepdim=True)
    idx = torch.from_numpy(got["topk_index"].astype(np.int64))
    head = TopK.head({"topk_logits": torch.from_numpy(got["topk_logits"])}, m).double()
    exact_at = ell.gather(-1, idx)
    assert ((head - exact_at).abs().amax(-1)[keep]).max() <= m.targets.step / 2 + 1e-5
    kth = ell.topk(9, dim=-1).values[..., 8]
    assert (exact_at.amin(-1) >= kth - 1e-5)[keep].all()
    rest = ell.scatter(-1, idx, float("-inf")).logsumexp(-1)
    np.testing.assert_allclose(got["tail_lse"][keep.numpy()], rest[keep].numpy(), atol=1e-4)

    # each written token lies in the top-0.9 nucleus of the distribution it was drawn from
    p = torch.softmax(ell, -1)
    y = torch.from_numpy(tokens[:, 1:])
    at = p.gather(-1, y[..., None])[..., 0]
    above = (p * (p > at[..., None])).sum(-1)
    assert (above[keep] < 0.9 + 1e-6).all()

    # inspect shows rows as text, what carries a loss marked, and why each response ended
    shown = subprocess.run([*DARKSTORE, "inspect", str(tmp_path / "s"), "--examples", "3"], env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("ended by") == 3 and shown.stdout.count("⟦") >= 3
    assert "written by the teachers: 2 per prompt to 12 prompts" in shown.stdout
    js = json.loads(subprocess.run([*DARKSTORE, "inspect", str(tmp_path / "s"), "--json"], env=cli_env(),
                                   capture_output=True, text=True, timeout=120).stdout)
    rows = r.finished_rows()[:2]
    assert [e["tokens"] for e in js["examples"]] == tokens[rows].tolist()
    assert [e["finish"] for e in js["examples"]] == [{1: "eos", 3: "length"}[int(f)] for f in finish[rows]]

    # the ensemble's statistics cover the written tokens (each member's too: every position, stride 1)
    nll64 = -torch.log_softmax(ell, -1).gather(-1, y[..., None])[..., 0][keep].sum()
    assert float(r.group["nll"][:][:, 0].sum()) == pytest.approx(float(nll64), rel=1e-5)
    assert int(r.group["stats"][:][:, 0].sum()) == int(count.sum()) == int(r.group["teacher_positions"][:].sum())
    own = -torch.log_softmax(z, -1).gather(-1, y[None, ..., None].expand(2, -1, -1, 1))[..., 0]
    np.testing.assert_allclose(r.group["nll"][:][:, 1:].sum(0), (own * keep).sum((1, 2)).numpy(), rtol=1e-5)


def test_greedy_arithmetic_and_stop_strings(kit, tmp_path):
    """Temperature 0 writes each position's most likely token under the arithmetic mean; a stop string ends a
    response at the token completing it, which is otherwise the same response."""
    def greedy(name: str, stop: list[str]) -> dict[str, np.ndarray]:
        spec = JobSpec.from_file(kit["job"](tmp_path / f"{name}.yaml", members=kit["members"][1:], combine="arithmetic",
                                            responses={"max_new_tokens": 20, "temperature": 0, "stop": stop}))
        run(spec, tmp_path / name, batch_size=1)  # each row alone: the same arithmetic whatever the row order
        got = arrays(tmp_path / name)
        return {k: v[np.argsort(got["index"])] for k, v in got.items()}

    got = greedy("plain", [])
    tokens = got["tokens"].astype(np.int64)
    plen, count = written(got)
    keep = torch.from_numpy(got["loss_mask"].astype(bool))
    z = member_logits64(tmp_path / "plain.yaml", tokens)
    p = torch.softmax(z, -1).mean(0)
    y = torch.from_numpy(tokens[:, 1:])
    top2 = p.topk(2, dim=-1).values
    at = p.gather(-1, y[..., None])[..., 0]
    assert ((at == top2[..., 0]) | (top2[..., 0] - top2[..., 1] < 1e-6))[keep].all()

    tok = load_tokenizer(kit["tokenizer"]).tokenizer
    texts = [[tok.decode([t], skip_special_tokens=False) for t in tokens[r, plen[r]:plen[r] + count[r]]]
             for r in range(len(tokens))]
    stop = next(t[5] for t in texts if len(t) > 5 and t[5].strip() and "\ufffd" not in t[5])
    cut = greedy("stopped", [stop])
    assert np.array_equal(cut["index"], got["index"])
    for r, pieces in enumerate(texts):
        ends = next((k for k in range(len(pieces)) if stop in "".join(pieces[:k + 1])), None)
        n = int(cut["loss_mask"][r].sum())
        if ends is None:
            assert cut["finish"][r] == got["finish"][r] and n == count[r]
        else:
            assert cut["finish"][r] == 2 and n == ends + 1
        assert np.array_equal(cut["tokens"][r, :plen[r] + n], got["tokens"][r, :plen[r] + n])
    assert (cut["finish"] == 2).any()


def test_a_killed_responses_job_resumes_and_two_shards_write_the_same_bytes(kit, tmp_path):
    job = kit["job"](tmp_path / "job.yaml", members=kit["members"][:1], chunk_rows=2,
                     responses={"max_new_tokens": 24, "n": 2, "seed": 9, "stop": ["\n\n"]})
    args = ["generate", "--job", str(job), "--batch-size", "2"]
    kill_generation_midway(args, tmp_path / "killed")
    resumed = subprocess.run([*DARKSTORE, *args, "--out", str(tmp_path / "killed")], env=cli_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    spec = JobSpec.from_file(job)
    run(spec, tmp_path / "clean", batch_size=2)
    for i in (0, 1):
        run(spec, tmp_path / "sharded", shard=Shard(i, 2), batch_size=2)
    a, b, c = (arrays(tmp_path / d) for d in ("killed", "clean", "sharded"))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(c[k], b[k], err_msg=k)
    other = JobSpec.from_file(kit["job"](tmp_path / "other.yaml", members=kit["members"][:1], chunk_rows=2,
                                         responses={"max_new_tokens": 24, "n": 2, "seed": 10, "stop": ["\n\n"]}))
    assert other.job_key(["x"], "d") != spec.job_key(["x"], "d")  # the decoding settings are part of the key
    run(other, tmp_path / "other", batch_size=2)
    d = arrays(tmp_path / "other")
    order_b, order_d = np.argsort(b["index"]), np.argsort(d["index"])
    assert not np.array_equal(d["tokens"][order_d], b["tokens"][order_b])  # another seed, other draws


@pytest.mark.parametrize("options, says", [
    ({"data": {"format": "files", "packing": "packed", "root": "{corpus}", "glob": "*.py"}},
     "responses are written to prompts: give a chat set"),
    ({"data": {"length": 8}}, "no prompt leaves room for a response in a row of 9 tokens"),
    ({"responses": {"stop": [""]}}, "a stop string must not be empty"),
    ({"members": [{"name": "e", "engine": {"url": "http://127.0.0.1:9", "model": "m"}}]},
     "engine teachers score given tokens; they do not write responses"),
    ({"data": {"kind": "arrays", "path": "x.npz"}}, "a transfer set of kind arrays holds none"),
])
def test_each_bad_responses_job_is_refused_in_one_line(kit, lm_kit, tmp_path, options, says):
    options = json.loads(json.dumps(options).replace("{corpus}", str(lm_kit["corpus"])))
    options.setdefault("responses", {})
    members = options.pop("members", kit["members"][:1])
    data = options.pop("data", {})
    job = kit["job"](tmp_path / "job.yaml", members=members, data={} if "kind" in data else data, **options)
    if "kind" in data:  # another kind of transfer set altogether
        spec = yaml.safe_load(job.read_text())
        job.write_text(yaml.safe_dump({**spec, "data": data}))
    done = subprocess.run([*DARKSTORE, "generate", "--job", str(job), "--out", str(tmp_path / "s")], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    one_error(done, tmp_path / "s", says)


@pytest.mark.parametrize("responses, says", [({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 0}, "top_p"),
                                             ({"temperature": -1}, "temperature"), ({"n": 0}, "n")])
def test_each_bad_decoding_setting_is_refused_when_the_job_is_read(kit, tmp_path, responses, says):
    from darkstore.errors import SpecError

    with pytest.raises(SpecError, match=f"responses.{says}"):
        JobSpec.from_file(kit["job"](tmp_path / "job.yaml", members=kit["members"][:1], responses=responses))


def test_a_student_of_written_responses_exports_a_model_that_answers_a_conversation(kit, tmp_path):
    """Prompts alone (no assistant turn) are answered; a student trained on the answers through the CLI, on the
    written tokens and their targets (--alpha), exports a transformers directory whose tokenizer renders the
    store's chat template and whose ``generate`` answers a conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asks = [{"messages": [{"role": "user", "content": f"Name {i}."}]} for i in range(6)]
    (tmp_path / "asks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in asks))
    data = {"root": str(tmp_path / "asks.jsonl")}
    job = kit["job"](tmp_path / "job.yaml", members=kit["members"][:1], data=data,
                     responses={"max_new_tokens": 8, "n": 2})
    scored = kit["job"](tmp_path / "scored.yaml", members=kit["members"][:1], data=data)
    refused = subprocess.run([*DARKSTORE, "generate", "--job", str(scored), "--out", str(tmp_path / "x")],
                             env=cli_env(), capture_output=True, text=True, timeout=120)
    one_error(refused, tmp_path / "x", "has no assistant turn")
    for args in (["generate", "--job", str(job), "--out", str(tmp_path / "s")],
                 ["train", "--store", str(tmp_path / "s"), "--student", "gpt", "--arch-kwargs",
                  json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": LENGTH}), "--epochs", "1",
                  "--batch-size", "4", "--alpha", "0.5", "--out", str(tmp_path / "run")],
                 ["export", str(tmp_path / "run"), "--format", "transformers"]):
        done = subprocess.run([*DARKSTORE, *args], env=cli_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    r = open_store(tmp_path / "s")
    assert r.meta.sequence.responses.prompts == 6 and r.meta.num_rows == 12
    out = tmp_path / "run" / "export" / "transformers"
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf_tok.chat_template == r.meta.sequence.chat.template
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "Name 3."}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    rows = r.read_chunks(r.finished_chunks(), ["tokens", "loss_mask", "index"])
    row = int(np.flatnonzero(rows["index"] // 2 == 3)[0])
    plen = int(rows["loss_mask"][row].argmax()) + 1
    assert list(ids) == rows["tokens"][row, :plen].tolist()  # the export renders a prompt as the store did
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    answer = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                            pad_token_id=hf_tok.pad_token_id)
    assert answer.shape[1] > len(ids) and answer[0, :len(ids)].tolist() == list(ids)


@pytest.mark.parametrize("scale", [0.5, 8.0])  # nearly flat (the nucleus needs a whole sort) and peaked (a top-k)
def test_the_sampler_draws_each_token_of_the_nucleus_at_its_renormalised_probability(scale):
    """Inverse CDFs over a stratified grid of uniforms: every token's share of the draws is its probability
    renormalised over the top-p nucleus (a float64 sort), whichever path found the nucleus."""
    from storage.schema import ResponsesRecord
    from teacher_service.kinds.responses import Sampler

    g = torch.Generator().manual_seed(0)
    ell = torch.randn(6, 1000, generator=g) * scale
    sampler = Sampler(ResponsesRecord(top_p=0.8, temperature=0.7), temperature=1.0)
    n = 2000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    per = 200  # uniforms a call: [6 · per, V] rows at once
    drawn = torch.cat([sampler.draw(ell.repeat(per, 1), u[i:i + per].repeat_interleave(6)).view(per, 6).t()
                       for i in range(0, n, per)], 1)
    p = torch.softmax(ell.double() / 0.7, -1)
    ps, order = p.sort(-1, descending=True)
    keep = (ps.cumsum(-1) - ps) < 0.8
    ref = torch.zeros_like(p).scatter(-1, order, ps * keep)
    ref /= ref.sum(-1, keepdim=True)
    freq = torch.zeros_like(p).scatter_add(-1, drawn, torch.ones_like(drawn, dtype=torch.float64)) / n
    assert ((freq > 0) <= (ref > 0)).all()  # nothing outside the nucleus
    assert (freq - ref).abs().max() <= 1.5 / n  # a stratified grid: each share within a grid step or so
