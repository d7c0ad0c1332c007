"""Stores at URLs, the way users reach them: the CLI's generate → inspect --verify → train → evaluate on
s3:// (a real S3-compatible server on loopback) and file://, the service with its store root on s3://,
and the errors for what cannot work (an unknown scheme, no credentials)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from storage import Location, open_store
from teacher_service.generate import generate

from .conftest import DARKSTORE, MEMBERS, cli_env, job, make_arrays, make_ensemble
from .procs import Api, service_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("urls")
    ens = make_ensemble(tmp / "teachers", MEMBERS[:2])
    data = make_arrays(tmp / "transfer.npz", n=200)
    reference = generate(job(ens, data, chunk_rows=64), tmp / "reference")
    return {"tmp": tmp, "ens": ens, "data": data, "ref": open_store(reference.path).read_all()}


def darkstore(args: list[str], env: dict, expect: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([*DARKSTORE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == expect, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    return p


@pytest.mark.parametrize("scheme", ["s3", "file"])
def test_cli_generate_inspect_train_evaluate_at_a_url(made, scheme, request, tmp_path):
    env = cli_env()
    if scheme == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        env.update(request.getfixturevalue("s3_server").env)
        url = f"s3://{bucket}/stores/digits"
    else:
        url = (tmp_path / "stores" / "digits").as_uri()
    darkstore(["generate", "--teachers", str(made["ens"]), "--data", str(made["data"]), "--out", url,
               "--chunk-rows", "64", "--row-order", "natural"], env)
    if scheme == "s3":
        assert not (tmp_path / "s3:").exists()  # no local folder named after the scheme
    got = open_store(url).read_all()  # this process reaches the same store through the same URL
    np.testing.assert_array_equal(got.logits, made["ref"].logits)
    np.testing.assert_array_equal(got.index, made["ref"].index)

    p = darkstore(["inspect", url, "--verify", "--json"], env)
    summary = json.loads(p.stdout)
    assert summary["complete"] and summary["rows"] == 200 and summary["path"] == str(Location.parse(url))
    assert summary["disk_bytes"] > 0

    run = tmp_path / "run"
    darkstore(["train", "--store", url, "--student", "mlp", "--arch-kwargs", '{"in_features": 64, "hidden": [16]}',
               "--out", str(run), "--epochs", "2", "--batch-size", "32"], env)
    s = json.loads((run / "summary.json").read_text())
    assert s["store"] == str(Location.parse(url).absolute()) and s["final"]["rows"] > 0
    p = darkstore(["eval", str(run), "--json", "--no-latency"], env)
    assert json.loads(p.stdout)["rows"] == s["final"]["rows"]

    # running the same job again finds the store complete: no teacher runs
    p = darkstore(["generate", "--teachers", str(made["ens"]), "--data", str(made["data"]), "--out", url,
                   "--chunk-rows", "64", "--row-order", "natural"], env)
    assert "already complete" in p.stdout + p.stderr


def test_a_damaged_chunk_on_s3_is_named_by_inspect_and_train(made, s3_bucket, s3_server, tmp_path):
    env = {**cli_env(), **s3_server.env}
    url = f"s3://{s3_bucket}/damaged"
    darkstore(["generate", "--teachers", str(made["ens"]), "--data", str(made["data"]), "--out", url,
               "--chunk-rows", "64"], env)
    loc = Location.parse(url)
    loc.write_bytes("logits/c/1/0", loc.read_bytes("logits/c/2/0"))  # chunk 2's bytes over chunk 1's
    p = darkstore(["inspect", url, "--verify"], env, expect=2)
    assert "chunk 1" in p.stderr and "logits" in p.stderr and "Traceback" not in p.stderr
    p = darkstore(["train", "--store", url, "--student", "mlp", "--arch-kwargs",
                   '{"in_features": 64, "hidden": [16]}', "--out", str(tmp_path / "run"), "--epochs", "1"], env,
                  expect=2)
    assert "chunk 1" in p.stderr and not (tmp_path / "run" / "summary.json").exists()


def test_unknown_scheme_and_missing_credentials_are_one_clear_error(made, s3_server, s3_bucket, tmp_path):
    gen = ["generate", "--teachers", str(made["ens"]), "--data", str(made["data"]), "--chunk-rows", "64"]
    p = darkstore([*gen, "--out", "gs://bucket/store"], cli_env(), expect=2)
    assert "unknown scheme 'gs'" in p.stderr and "Traceback" not in p.stderr
    p = darkstore([*gen, "--out", "s3:bucket/store"], cli_env(), expect=2)
    assert "without '//'" in p.stderr
    assert not any(tmp_path.iterdir())
    # the right endpoint but no credentials anywhere (no keys, no profile, no instance metadata)
    env = {k: v for k, v in cli_env().items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server.url, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_DEFAULT_REGION="us-east-1")
    p = darkstore(["inspect", f"s3://{s3_bucket}/anything"], env, expect=2)
    assert "cannot reach" in p.stderr and "AWS_ACCESS_KEY_ID" in p.stderr and "Traceback" not in p.stderr


def test_the_service_keeps_its_stores_on_s3(made, s3_server, s3_bucket, tmp_path):
    """``DARKSTORE_STORE_ROOT=s3://…``: a submitted job's store is created and filled on the S3 server,
    the API summarises and verifies it there, and a second submit of the same job runs no teacher."""
    from teacher_service.client import DarkstoreClient

    root = made["tmp"]
    env = {**service_env(home=tmp_path / "home", data_roots=root, store_root=f"s3://{s3_bucket}/service"),
           **s3_server.env}
    api = Api(env, tmp_path / "api.log", "--local")
    try:
        body = {"teachers": {"num_classes": 5, "members": [
            {"name": f"t{i}", "arch": m["arch"], "arch_kwargs": m["arch_kwargs"], "weights": f"teachers/t{i}.safetensors"}
            for i, m in enumerate(MEMBERS[:2])]},
            "data": {"kind": "arrays", "path": "transfer.npz"}, "chunk_rows": 64, "row_order": "natural"}
        with DarkstoreClient(api.url, timeout=60) as c:
            sub = c.submit(body)
            view, created = sub.job, sub.created
            done = c.wait(view.id, timeout=120)
            assert created and done.state == "succeeded", (done.error, api.text()[-3000:])
            assert done.store == f"s3://{s3_bucket}/service/{view.id}"
            summary = c.store(view.id, verify=True)
            assert summary.complete and summary.rows == 200
            np.testing.assert_array_equal(open_store(done.store).read_all().logits, made["ref"].logits)
            sub = c.submit(body)
            again, created = sub.job, sub.created
            assert not created and again.id == view.id
            events = [e.event for e in c.events(view.id)]
            assert events.count("task_started") == 1
    finally:
        api.stop()
    assert not (tmp_path / "home" / "stores").exists()  # nothing local but the job records
