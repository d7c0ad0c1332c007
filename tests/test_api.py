"""The HTTP API over real HTTP (uvicorn in a subprocess), in local mode: no Redis.

Security and bad input: every refusal is a 4xx with a clear JSON message, never a 500.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from darkstore.errors import DarkstoreError
from storage import open_store
from teacher_service.client import ApiError, DarkstoreClient
from teacher_service.generate import generate

from .conftest import DARKSTORE, MEMBERS, cli_env, make_arrays, make_ensemble
from .procs import Api, service_env

TOKEN = "s3cret-token"


class Evil:
    """A pickle whose loading would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A data root with teachers, a transfer set and some traps, plus a folder outside it."""
    tmp = tmp_path_factory.mktemp("api")
    root = tmp / "data"
    root.mkdir()
    make_ensemble(root / "teachers", MEMBERS)
    make_arrays(root / "transfer.npz", n=300)
    outside = tmp / "outside"
    make_ensemble(outside, MEMBERS[:1])
    (root / "teachers" / "link.safetensors").symlink_to(outside / "t0.safetensors")
    with open(root / "teachers" / "evil.pt", "wb") as f:
        pickle.dump(Evil(tmp / "PWNED"), f)
    # malformed and hostile files
    (root / "empty.npz").write_bytes(b"")
    np.savez(root / "noarrays.npz")
    np.savez(root / "zero_rows.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    whole = (root / "transfer.npz").read_bytes()
    (root / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    os.mkfifo(root / "fifo.npz")
    (root / "tv").mkdir()
    env = service_env(home=tmp / "home", data_roots=root, token=TOKEN, max_body_bytes=20_000,
                      max_teacher_params=100_000_000)
    api = Api(env, tmp / "api.log", "--local")
    yield {"tmp": tmp, "root": root, "api": api, "outside": outside}
    api.stop()


def body(**changes) -> dict:
    """A valid job body with paths relative to the data root, as a client would send it."""
    doc = {
        "teachers": {
            "num_classes": 5,
            "members": [
                {"name": f"t{i}", "arch": m["arch"], "arch_kwargs": m["arch_kwargs"],
                 "weights": f"teachers/t{i}.safetensors"}
                for i, m in enumerate(MEMBERS)
            ],
        },
        "data": {"kind": "arrays", "path": "transfer.npz"},
        "chunk_rows": 64,
    }
    doc.update(changes)
    return doc


def with_member(**member) -> dict:
    b = body()
    b["teachers"]["members"][0] = {**b["teachers"]["members"][0], **member}
    return b


def got_key(store: str) -> str:
    return open_store(store).meta.job_key


def client(site, token=TOKEN) -> DarkstoreClient:
    return DarkstoreClient(site["api"].url, token=token, timeout=60)


def test_submit_dedup_wait_store_list_metrics(site):
    with client(site) as c:
        sub = c.submit(body())
        view, created = sub.job, sub.created
        assert created and view.state in ("queued", "running", "succeeded")
        done = c.wait(view.id, timeout=120)
        assert done.state == "succeeded", done.error
        assert done.progress.rows_done == done.progress.rows_total == 300
        assert done.progress.chunks_done == done.progress.chunks_total == 5
        assert done.rows_per_second and done.rows_per_second > 0 and done.eta_seconds is None

        sub = c.submit(body())  # same teachers, data and options
        again, created = sub.job, sub.created
        assert not created and again.id == view.id

        # the store is exactly what `darkstore generate` writes for the same spec
        from teacher_service.spec import JobSpec

        spec = JobSpec.model_validate(body()).rebased(site["root"])
        ref = open_store(generate(spec, site["tmp"] / "ref").path).read_all()
        got = open_store(done.store).read_all()
        np.testing.assert_array_equal(got.logits, ref.logits)
        np.testing.assert_array_equal(got.labels, ref.labels)

        summary = c.store(view.id)
        assert summary.complete and summary.rows == 300 and len(summary.teachers) == 3

        sub = c.submit(body(dtype="float32"))
        other, created = sub.job, sub.created
        assert created and other.id != view.id
        c.wait(other.id, timeout=120)
        done_jobs = c.jobs(state="succeeded")
        assert done_jobs.total >= 2 and {view.id, other.id} <= {v.id for v in done_jobs.items}
        page = c.jobs(limit=1, offset=1)
        assert len(page.items) == 1 and page.total >= 2 and (page.limit, page.offset) == (1, 1)
        assert c.jobs(state="failed").total == 0
        # typed answers throughout: health, readiness, events, the store summary
        assert c.health().status == "ok" and c.ready().mode == "local"
        assert all(isinstance(e.time, str) and e.event for e in c.events(view.id))
        assert isinstance(summary.disk_bytes, int) and summary.job_key == got_key(done.store)

        events = [e.event for e in c.events(view.id)]
        assert events[0] == "submitted" and events.count("chunk_committed") == 5

        # a views job over REST: the same fields as `darkstore generate --views --augment`
        aug = {"views": 3, "ops": [{"op": "affine", "translate": 0.125}, {"op": "hflip"}]}
        sub = c.submit(body(augment=aug))
        vjob, created = sub.job, sub.created
        assert created
        vdone = c.wait(vjob.id, timeout=120)
        assert vdone.state == "succeeded", vdone.error
        vs = c.store(vjob.id)
        assert vs.views_per_sample == 3 and vs.rows == 900 and vs.samples == 300

        # teacher features over REST: the same fields as `darkstore generate --keep-features`
        sub = c.submit(body(features=[{"teacher": "t0", "layer": "features.5", "pool": 2}]))
        fjob, created = sub.job, sub.created
        assert created and c.wait(fjob.id, timeout=120).state == "succeeded"
        fs = c.store(fjob.id)
        assert [(f["name"], f["shape"]) for f in fs.features] == [("t0:features.5", [4, 2, 2])]

    text = httpx.get(site["api"].url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert 'darkstore_jobs{state="succeeded"}' in text
    line = next(ln for ln in text.splitlines() if ln.startswith('darkstore_jobs{state="succeeded"}'))
    assert float(line.split()[-1]) >= 2
    rows = next(ln for ln in text.splitlines() if ln.startswith("darkstore_rows_written"))
    assert float(rows.split()[-1]) >= 600
    assert "darkstore_rows_per_second" in text


def test_token_required_everywhere_but_health(site):
    url = site["api"].url
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/readyz").json()["status"] == "ready"
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/abc"), ("DELETE", "/v1/jobs/abc"),
                         ("POST", "/v1/jobs/abc/resume"), ("GET", "/v1/stores/abc"), ("GET", "/metrics"),
                         ("GET", "/v1/jobs/abc/events"), ("GET", "/openapi.json"), ("GET", "/docs"),
                         ("GET", "/redoc")]:
        r = httpx.request(method, url + path, json=body() if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["detail"] == "missing bearer token" and r.headers["www-authenticate"] == "Bearer"
        r = httpx.request(method, url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["detail"] == "wrong bearer token"
    with pytest.raises(ApiError) as e:
        with client(site, token="nope") as c:
            c.jobs()
    assert e.value.status == 401


BAD = [
    # (name, request body or raw bytes, status, words in the message)
    ("malformed json", b'{"teachers": ', 422, "JSON"),
    ("not an object", b"[1, 2]", 422, "invalid request"),
    ("unknown top-level field", body(colour="blue"), 422, "colour: Extra inputs are not permitted"),
    ("unknown member field", with_member(weigths="x"), 422, "weigths"),
    ("unknown data kind", body(data={"kind": "parquet", "path": "x"}), 422, "parquet"),
    ("bad dtype", body(dtype="float8"), 422, "dtype"),
    ("zero chunk rows", body(chunk_rows=0), 422, "chunk_rows"),
    ("missing teachers", {"data": {"kind": "arrays", "path": "transfer.npz"}}, 422, "teachers: Field required"),
    ("dot-dot outside roots", with_member(weights="../outside/t0.safetensors"), 403, "outside the data roots"),
    ("absolute path outside roots", body(data={"kind": "arrays", "path": "/etc/hostname"}), 403, "outside the data roots"),
    ("symlink out of the roots", with_member(weights="teachers/link.safetensors"), 403, "outside the data roots"),
    ("missing weights", with_member(weights="teachers/nope.safetensors"), 422, "not found"),
    ("missing data", body(data={"kind": "arrays", "path": "nope.npz"}), 422, "nope.npz"),
    ("unsafe pickle", with_member(weights="teachers/evil.pt"), 422, "needs code to load"),
    ("torchscript not allowed", with_member(arch=None, arch_kwargs={}, format="torchscript",
                                            weights="teachers/t0.safetensors"), 403, "allow"),
    ("factory not allowed", with_member(arch=None, arch_kwargs={}, weights=None, factory="tests.factories:tiny_mlp"),
     403, "DARKSTORE_ALLOW_CODE"),
    ("weights of another architecture", with_member(arch_kwargs={"in_channels": 1, "width": 9}), 422,
     "does not fit the architecture"),
    ("too large", body(padding="x" * 30_000), 413, "over 20000 bytes"),
    ("unknown augmentation op", body(augment={"views": 2, "ops": [{"op": "elastic"}]}), 422, "elastic"),
    ("mix op not last", body(augment={"views": 2, "ops": [{"op": "mixup"}, {"op": "hflip"}]}), 422,
     "must be the last op"),
    # each of these answered 500 (or hung) before
    ("empty npz", body(data={"kind": "arrays", "path": "empty.npz"}), 422, "cannot read transfer set"),
    ("a transfer set of 0 rows", body(data={"kind": "arrays", "path": "zero_rows.npz"}), 422,
     "the transfer set is empty"),
    ("npz without arrays", body(data={"kind": "arrays", "path": "noarrays.npz"}), 422, "has no array 'x'"),
    ("truncated npz", body(data={"kind": "arrays", "path": "truncated.npz"}), 422, "cannot read transfer set"),
    ("NUL byte in a weights path", with_member(weights="teachers/t0\u0000.safetensors"), 422, "NUL byte"),
    ("abstract torchvision dataset", body(data={"kind": "torchvision", "name": "VisionDataset", "root": "tv"}), 422,
     "VisionDataset"),
    ("a FIFO named like data", body(data={"kind": "arrays", "path": "fifo.npz"}), 422, "not a regular file"),
    ("a huge MLP", with_member(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [16000, 16000]}), 422,
     "over the limit of 100,000,000"),
    ("negative width", with_member(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [-3]}), 422,
     "bad arch_kwargs"),
    ("a huge resize", with_member(preprocess={"resize": 100000}), 422, "outside 1..4096"),
    ("a huge image size", body(data={"kind": "image_folder", "root": "teachers", "size": [8, 10**9]}), 422,
     "outside 1..4096"),
    ("features of an unknown teacher", body(features=["ghost:features.5"]), 422, "no teacher named 'ghost'"),
    ("features of an unknown layer", body(features=["t0:nope"]), 422, "has no layer 'nope'"),
    ("members beside sparse targets", body(keep_members=True, targets="topk:2"), 422,
     "keep members in a dense store"),
]


@pytest.mark.parametrize("name,payload,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_clear_4xx(site, name, payload, code, words):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = httpx.post(site["api"].url + "/v1/jobs", content=content, headers=headers, timeout=60)
    assert r.status_code == code, r.text
    b = r.json()
    assert set(b) >= {"error", "detail"} and words in b["detail"], b
    assert str(site["root"]) not in b["detail"] and str(site["tmp"]) not in b["detail"]  # no server paths
    assert not (site["tmp"] / "PWNED").exists()  # the pickle's payload never ran


def test_chunked_body_over_the_limit_is_refused(site):
    def gen():
        for _ in range(30):
            yield b" " * 1000

    r = httpx.post(site["api"].url + "/v1/jobs", content=gen(),
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "over 20000 bytes" in r.json()["detail"]


def test_unknown_ids_and_bad_queries(site):
    h = {"Authorization": f"Bearer {TOKEN}"}
    url = site["api"].url
    for path in ("/v1/jobs/0123456789abcdef01234567", "/v1/stores/0123456789abcdef01234567", "/v1/jobs/a.b"):
        r = httpx.get(url + path, headers=h)
        assert r.status_code == 404 and "no job" in r.json()["detail"], r.text
    r = httpx.get(url + "/v1/jobs/..%2F..%2Fetc%2Fpasswd", headers=h)
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    assert httpx.delete(url + "/v1/jobs/nope", headers=h).status_code == 404
    assert httpx.post(url + "/v1/jobs/nope/resume", headers=h).status_code == 404
    for path in ("/v1/jobs/" + "a" * 10_000, "/v1/stores/" + "a" * 10_000, "/v1/jobs/" + "a" * 10_000 + "/events"):
        r = httpx.get(url + path, headers=h)
        assert r.status_code in (404, 422) and len(r.text) < 2000, r.text[:300]
    r = httpx.get(url + "/v1/jobs?state=exploded", headers=h)
    assert r.status_code == 422 and "state" in r.json()["detail"]
    assert httpx.get(url + "/v1/jobs?limit=0", headers=h).status_code == 422


def test_openapi_describes_every_route_and_error(site):
    assert httpx.get(site["api"].url + "/openapi.json").status_code == 401
    doc = httpx.get(site["api"].url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    paths = doc["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/resume", "/v1/stores/{job_id}", "/healthz",
              "/readyz", "/metrics"):
        assert p in paths
    post = paths["/v1/jobs"]["post"]["responses"]
    assert {"200", "201", "401", "403", "413", "422"} <= set(post)
    assert post["403"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "404" in paths["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "JobSpec" in doc["components"]["schemas"]


def test_client_inlines_spec_files_named_in_a_dict(site, tmp_path, monkeypatch):
    """submit() takes a dict whose teachers:/data: name spec files (relative to the working directory), as it
    takes a spec file: the files are read in, the dict is left as it was, and the job is the same job."""
    doc = body(chunk_rows=100)
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(doc["teachers"]))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(doc["data"]))
    monkeypatch.chdir(tmp_path)
    named = {**doc, "teachers": "ensemble.yaml", "data": "data.yaml"}
    with client(site) as c:
        first = c.submit(doc)
        again = c.submit(named)
        assert again.id == first.id and not again.created and named["teachers"] == "ensemble.yaml"
        assert c.wait(first.id, timeout=120).state == "succeeded"
        with pytest.raises(DarkstoreError, match="missing.yaml"):
            c.submit({**doc, "teachers": "missing.yaml"})


def generate_and_submit(site, job: Path, local: Path):
    """``darkstore generate --job JOB --out LOCAL``, then ``darkstore submit JOB --wait`` (told the data root):
    the served job's view, and the environment submit ran with."""
    r = subprocess.run([*DARKSTORE, "generate", "--job", str(job), "--out", str(local)], env=cli_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    env = service_env(api_url=site["api"].url, token=TOKEN, data_roots=site["root"])
    r = subprocess.run([*DARKSTORE, "submit", str(job), "--wait"], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    with client(site) as c:
        return c.job(r.stdout.strip().splitlines()[0]), env


def test_generate_and_submit_read_one_job_file_alike(site, tmp_path):
    """One job file naming an ensemble.yaml whose weights are relative to it: `generate` and `submit` (told
    where the data root is, as the pipeline's .env tells it) run the same teachers on the same data."""
    import shutil

    proj = site["root"] / "proj"
    shutil.copytree(site["root"] / "teachers", proj / "teachers", symlinks=True)
    (proj / "teachers" / "ensemble.yaml").write_text(yaml.safe_dump(
        {"num_classes": 5, "members": [{"name": f"t{i}", "arch": m["arch"], "arch_kwargs": m["arch_kwargs"],
                                        "weights": f"t{i}.safetensors"} for i, m in enumerate(MEMBERS)]}))
    (proj / "job.yaml").write_text(yaml.safe_dump({"teachers": "teachers/ensemble.yaml",
                                                   "data": {"kind": "arrays", "path": "../transfer.npz"},
                                                   "chunk_rows": 150}))
    local = tmp_path / "local"
    served, env = generate_and_submit(site, proj / "job.yaml", local)
    assert served.job_key == open_store(local).meta.job_key  # the same weights, data and options: the same job
    # a path that leaves the data root is refused before anything is sent
    (proj / "far.yaml").write_text(yaml.safe_dump({"teachers": "teachers/ensemble.yaml",
                                                   "data": {"kind": "arrays", "path": "../../transfer.npz"}}))
    r = subprocess.run([*DARKSTORE, "submit", str(proj / "far.yaml")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "lies outside the data root" in r.stderr and "HTTP" not in r.stderr, r.stderr


def test_language_model_jobs_over_rest_match_generate(site, lm_kit, tmp_path):
    """LM teachers over a text corpus through `darkstore submit` (paths relative to the job file, sent relative
    to the data root) and a raw REST body: the same job key and targets as `darkstore generate`, progress in
    tokens, a top-k and a sampled store."""
    import shutil

    proj = site["root"] / "lm"
    shutil.copytree(lm_kit["root"], proj)
    shutil.copytree(lm_kit["corpus"], proj / "corpus", ignore=shutil.ignore_patterns("__pycache__"))
    members = lm_kit["members"][:2]
    job = {"teachers": {"members": members}, "targets": "topk:8", "chunk_rows": 256,
           "data": {"kind": "text", "root": "corpus", "glob": "*.py", "tokenizer": "tok", "length": 32}}
    (proj / "job.yaml").write_text(yaml.safe_dump(job))
    local = tmp_path / "local"
    served, _ = generate_and_submit(site, proj / "job.yaml", local)
    with client(site) as c:
        assert served.state == "succeeded" and served.job_key == open_store(local).meta.job_key
        length, rows = 32, served.progress.rows_total
        assert served.progress.tokens_done == served.progress.tokens_total == rows * length
        assert served.tokens_per_second and served.tokens_per_second > 0
        a, b = open_store(served.store), open_store(local)
        for name in ("tokens", "topk_index", "topk_logits", "tail_lse"):
            np.testing.assert_array_equal(a.read_field(name), b.read_field(name), err_msg=name)

        body = {**job, "targets": "sampled:8", "teachers": {"members": [
            {**m, "weights": f"lm/{m['weights']}", **({"tokenizer": f"lm/{m['tokenizer']}"} if "tokenizer" in m else {})}
            for m in members]}, "data": {**job["data"], "root": "lm/corpus", "tokenizer": "lm/tok"}}
        sub = c.submit(body)
        done = c.wait(sub.job.id, timeout=120)
        assert done.state == "succeeded", done.error
        s = c.store(sub.job.id)
        assert s.targets == "sampled:8@1" and s.sequence["length"] == 32 and s.perplexity["ensemble"] > 1


def test_a_responses_job_over_rest_matches_generate(site, chat_kit):
    """Teachers writing responses to chat prompts, submitted with `darkstore submit`: the same key and bytes as
    `darkstore generate`, progress counted in responses."""
    import shutil

    proj = site["root"] / "chat"
    shutil.copytree(chat_kit["root"], proj)
    job = chat_kit["job"](proj / "job.yaml", members=chat_kit["members"][:2], at=None,
                          responses={"max_new_tokens": 12, "n": 2, "seed": 4, "top_p": 0.95})
    served, _ = generate_and_submit(site, job, proj / "local")
    assert served.state == "succeeded", served.error
    a, b = open_store(served.store), open_store(proj / "local")
    assert a.meta.job_key == b.meta.job_key and a.meta.sequence.responses.prompts == 12
    assert served.progress.rows_done == 24 and served.progress.tokens_total is None
    written = int(b.group["stats"][:][:, 0].sum())
    assert served.progress.tokens_written == written and served.tokens_per_second > 0
    for name in ("tokens", "loss_mask", "finish", "topk_index", "topk_logits", "tail_lse"):
        np.testing.assert_array_equal(a.read_field(name), b.read_field(name), err_msg=name)


def test_a_store_generate_made_is_adopted_not_recomputed(site, tmp_path):
    """`submit --adopt STORE`: the store `generate` made for this very job, inside the data root, is verified
    and becomes the job's store (no teacher runs); a store of another job is refused."""
    from teacher_service.spec import JobSpec

    doc = body(chunk_rows=60, dtype="float32", compressor="none")
    made = generate(JobSpec.model_validate(doc).rebased(site["root"]), site["root"] / "made_here").path
    spec = site["root"] / "adopt.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = service_env(api_url=site["api"].url, token=TOKEN, data_roots=site["root"])
    r = subprocess.run([*DARKSTORE, "submit", str(spec), "--adopt", str(made), "--wait"], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "succeeded" in r.stderr, r.stderr
    with client(site) as c:
        job_id = r.stdout.strip().splitlines()[0]
        events = [e.event for e in c.events(job_id)]
        assert "adopted" in events and "dispatched" not in events, events  # no teacher ran
        view = c.job(job_id)
    assert view.store != str(made) and open_store(view.store).complete
    np.testing.assert_array_equal(open_store(view.store).read_all().logits, open_store(made).read_all().logits)
    other = site["root"] / "other.yaml"
    other.write_text(yaml.safe_dump(body(chunk_rows=60, dtype="float16", compressor="none")))
    r = subprocess.run([*DARKSTORE, "submit", str(other), "--adopt", str(made)], env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 2 and "holds another job" in r.stderr, r.stderr


def test_cli_submit_wait_and_jobs(site, tmp_path):
    spec = site["root"] / "job.yaml"
    spec.write_text(yaml.safe_dump(body(chunk_rows=100)))
    env = service_env(api_url=site["api"].url, token=TOKEN)
    r = subprocess.run([*DARKSTORE, "submit", str(spec), "--wait"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[0]
    assert "succeeded" in r.stderr and "300/300 rows" in r.stderr
    r = subprocess.run([*DARKSTORE, "jobs", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert job_id in {j["id"] for j in json.loads(r.stdout)["items"]}
    r = subprocess.run([*DARKSTORE, "jobs", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in r.stdout and "300/300" in r.stdout
    # the same spec again: known, nothing to do
    r = subprocess.run([*DARKSTORE, "submit", str(spec)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "already known" in r.stderr and r.stdout.strip() == job_id
    # errors are one clear line, exit code 2
    bad = site["root"] / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_member(weights="../outside/t0.safetensors")))
    r = subprocess.run([*DARKSTORE, "submit", str(bad)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "outside the data roots" in r.stderr and "HTTP 403" in r.stderr
    r = subprocess.run([*DARKSTORE, "jobs", "--token", "wrong"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "wrong bearer token" in r.stderr
    env["DARKSTORE_API_URL"] = "http://127.0.0.1:9"  # nothing listens there
    r = subprocess.run([*DARKSTORE, "jobs"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the darkstore API" in r.stderr


def test_local_api_restart_mid_job_keeps_state_and_finishes(tmp_path):
    """`serve --local`: stop the API mid-job; the restarted one picks the job up where it was."""
    root = tmp_path / "data"
    root.mkdir()
    make_arrays(root / "transfer.npz", n=400)
    counter = tmp_path / "forwards"
    spec = {"teachers": {"num_classes": 5, "members": [{"name": "slow", "factory": "tests.factories:slow_mlp",
                                                         "arch_kwargs": {"delay": 0.15, "counter": str(counter)}}]},
            "data": {"kind": "arrays", "path": "transfer.npz"}, "chunk_rows": 25}
    env = service_env(home=tmp_path / "home", data_roots=root, allow_code=True, batch_size=25)
    api = Api(env, tmp_path / "api1.log", "--local")
    try:
        with DarkstoreClient(api.url, timeout=60) as c:
            view = c.submit(spec).job
            deadline = time.monotonic() + 60
            while c.job(view.id).progress.chunks_done < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        api.kill(signal.SIGTERM)  # graceful: stops after the chunk in progress
    rec = json.loads((tmp_path / "home" / "jobs" / f"{view.id}.json").read_text())
    assert rec["state"] == "running"  # not cancelled, not failed: it will be picked up again
    before = open_store(rec["store"], allow_incomplete=True).finished_chunks()
    assert 3 <= len(before) < 16

    api = Api(env, tmp_path / "api2.log", "--local")
    try:
        with DarkstoreClient(api.url, timeout=60) as c:
            v = c.job(view.id)
            assert v.state in ("queued", "running") and v.progress.chunks_done >= len(before)
            done = c.wait(view.id, timeout=120)
            assert done.state == "succeeded", done.error
            events = [e.event for e in c.events(view.id)]
            assert "requeued" in events
    finally:
        api.stop()
    # each chunk's forward ran once, plus the probes at submit and at each (re)start
    n_forwards = len(counter.read_bytes())
    assert 16 <= n_forwards <= 16 + 1 + 3


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx_and_match_the_schema(site):
    """Property-based fuzzing of every operation in the OpenAPI schema (schemathesis), schema-valid and
    schema-invalid requests, path ids drawn from real jobs as well as random strings: no 5xx, and every
    answer's status, content type and body conform to the schema."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    url, h = site["api"].url, {"Authorization": f"Bearer {TOKEN}"}
    with client(site) as c:
        done = c.submit(body(chunk_rows=150)).job
        assert c.wait(done.id, timeout=120).state == "succeeded"
    real_ids = [done.id]
    schema = schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json", headers=h).json())
    calls: dict[str, int] = {}
    bad: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        examples = 300 if op.method.upper() == "POST" and op.path == "/v1/jobs" else 80
        strategies = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(op.as_strategy(mode))
            if "{job_id}" in op.path:
                strategies += [op.as_strategy(mode, path_parameters={"job_id": j}) for j in real_ids]

        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies))
        def fuzz(case):
            r = case.call(base_url=url, headers=h, timeout=60)
            calls[op.label] = calls.get(op.label, 0) + 1
            if r.status_code >= 500:
                bad.append(f"{op.label}: {r.status_code} {r.text[:300]} for {case.path_parameters} {case.body!r:.200}")
                return
            try:
                case.validate_response(r, checks=[status_code_conformance, content_type_conformance,
                                                  response_schema_conformance])
            except BaseException as exc:  # noqa: BLE001 — schemathesis raises exception groups; collect them all
                if isinstance(exc, KeyboardInterrupt):
                    raise
                bad.append(f"{op.label}: {r.status_code} violates the schema: {str(exc)[:300]}")

        fuzz()
    assert not bad, "\n".join(bad[:20])
    assert sum(calls.values()) >= 700, calls
    assert len(calls) >= 8, calls  # every operation was exercised


def test_store_verify_names_a_damaged_chunk(site):
    """GET /v1/stores/{id}?verify=true reads every committed chunk: a chunk swapped after its commit is a 409
    naming the chunk and the field."""
    import shutil
    from pathlib import Path

    with client(site) as c:
        view = c.submit(body(chunk_rows=50)).job
        done = c.wait(view.id, timeout=120)
        assert done.state == "succeeded", done.error
        ok = c.store(view.id, verify=True)
        assert ok.verified and ok.complete
        store = Path(done.store)
        shutil.copyfile(store / "logits" / "c" / "3" / "0", store / "logits" / "c" / "2" / "0")
        assert not c.store(view.id).verified  # the plain summary does not read chunks
        with pytest.raises(ApiError) as e:
            c.store(view.id, verify=True)
        assert e.value.status == 409 and "chunk 2 " in e.value.detail and "field logits" in e.value.detail
