"""Generation: correctness, kill-and-resume, and every bad input the issue names."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from darkstore.data import parse_data_spec
from darkstore.models import build_model, save_weights
from storage import open_store
from darkstore.errors import (
    ClassCountMismatchError,
    CodeNotAllowedError,
    DataError,
    DataNotFoundError,
    DarkstoreError,
    UnknownArchitectureError,
    UnsafeWeightsError,
    WeightsError,
    WeightsNotFoundError,
)
from storage.errors import NonFiniteLogitsError
from teacher_service.generate import generate
from teacher_service.spec import EnsembleSpec

from .conftest import DARKSTORE, cli_env, job, make_arrays, make_ensemble, reference_member_logits
from .procs import kill_generation_midway


def arrays_of(store: Path) -> dict[str, np.ndarray]:
    r = open_store(store)
    out = {name: r.group[name][:] for name in ("logits", "labels", "index", "stats", "done")}
    if r.meta.keep_members:
        out["members"] = r.group["members"][:]
    return out


def test_store_holds_the_ensemble_mean_and_provenance(tmp_path, ensemble, arrays):
    w = generate(job(ensemble, arrays, dtype="float32", chunk_rows=64, keep_members=True), tmp_path / "s")
    r = open_store(w.path)
    z = reference_member_logits(ensemble, arrays)
    ref = z.mean(0)
    ref -= ref.max(-1, keepdims=True)
    c = r.read_all(members=True)
    np.testing.assert_allclose(c.logits, ref, atol=1e-4)
    np.testing.assert_allclose(c.members, z - z.max(-1, keepdims=True), atol=1e-4)
    assert (c.logits.max(-1) == 0).all()
    with np.load(arrays) as a:
        np.testing.assert_array_equal(c.labels, a["y"])
        y = a["y"]
    # provenance: hashes, parameter counts, fingerprint, recorded accuracy
    m = r.meta
    assert [t.name for t in m.teachers] == ["t0", "t1", "t2"]
    for t in m.teachers:
        import hashlib

        assert t.sha256 == hashlib.sha256(Path(t.weights).read_bytes()).hexdigest()
        assert t.num_params > 0
    assert m.transfer_set.num_samples == 300 and len(m.transfer_set.fingerprint) == 64
    acc = r.accuracy()
    assert acc["ensemble"] == pytest.approx((ref.argmax(-1) == y).mean())
    assert acc["t1"] == pytest.approx((z[1].argmax(-1) == y).mean())


def test_bfloat16_autocast_is_another_job_close_to_float32(tmp_path, ensemble, arrays):
    w32 = generate(job(ensemble, arrays, dtype="float32", chunk_rows=64), tmp_path / "f32")
    w16 = generate(job(ensemble, arrays, dtype="float32", chunk_rows=64, precision="bfloat16"), tmp_path / "bf16",
                   channels_last=True)
    assert w16.meta.job_key != w32.meta.job_key and w16.meta.job["precision"] == "bfloat16"
    a, b = open_store(w32.path).read_all().logits, open_store(w16.path).read_all().logits
    assert not np.array_equal(a, b)  # autocast really ran in bfloat16 …
    z = reference_member_logits(ensemble, arrays)
    scale = np.abs(z).max()
    np.testing.assert_allclose(b, a, atol=0.05 * scale)  # … within bfloat16's precision of the float64 truth
    np.testing.assert_allclose(a, (z.mean(0) - z.mean(0).max(-1, keepdims=True)), atol=1e-4)


def test_rerunning_a_finished_job_does_nothing(tmp_path, ensemble, arrays):
    spec = job(ensemble, arrays, chunk_rows=64)
    generate(spec, tmp_path / "s")
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*") if p.is_file()}
    rows = []
    generate(spec, tmp_path / "s", on_rows=rows.append)
    assert rows == []
    assert files == {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*") if p.is_file()}


def test_killed_generation_resumes_to_identical_store(tmp_path):
    """SIGKILL a `darkstore generate` subprocess mid-run, rerun it, compare with an uninterrupted run."""
    data = make_arrays(tmp_path / "big.npz", n=6000, classes=5, seed=3)
    ens = make_ensemble(tmp_path / "teachers", [
        {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 48}},
        {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 48}},
    ])
    args = ["generate", "--teachers", str(ens), "--data", str(data), "--chunk-rows", "100", "--batch-size", "50",
            "--keep-members", "--combine", "arithmetic", "--temperature", "3"]
    killed = tmp_path / "killed"
    kill_generation_midway(args, killed)

    resumed = subprocess.run([*DARKSTORE, *args, "--out", str(killed)], env=cli_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    clean = subprocess.run([*DARKSTORE, *args, "--out", str(tmp_path / "clean")], env=cli_env(),
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    a, b = arrays_of(killed), arrays_of(tmp_path / "clean")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert open_store(killed).complete


def test_options_given_with_a_job_file_win_over_its_settings(tmp_path, ensemble, arrays):
    """`generate --job FILE` keeps the file's settings, except those given on the command line."""
    doc = {"teachers": str(ensemble), "data": str(arrays), "combine": "arithmetic", "temperature": 2.0,
           "chunk_rows": 100, "row_order": "natural"}
    (tmp_path / "job.yaml").write_text(json.dumps(doc))
    r = subprocess.run([*DARKSTORE, "generate", "--job", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "s"),
                        "--dtype", "float32", "--chunk-rows", "64"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = open_store(tmp_path / "s").meta
    assert (meta.dtype, meta.chunk_rows) == ("float32", 64)  # given here
    assert (meta.combine, meta.temperature, meta.row_order) == ("arithmetic", 2.0, "natural")  # the file's


# --- bad inputs: clear errors, nothing marked complete --------------------------------
def _no_complete_store(path: Path) -> None:
    if path.exists():
        assert not open_store(path, allow_incomplete=True).complete


def _ensemble_doc(tmp_path, members, **extra) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"members": members, **extra}))
    return p


def test_unknown_architecture(tmp_path, arrays):
    ens = _ensemble_doc(tmp_path, [{"arch": "resnet9000", "weights": "x.safetensors"}], num_classes=5)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(UnknownArchitectureError, match="resnet9000"):
        generate(job(ens, arrays), tmp_path / "s")
    _no_complete_store(tmp_path / "s")


def test_missing_weights(tmp_path, arrays):
    ens = _ensemble_doc(tmp_path, [{"arch": "mlp", "arch_kwargs": {"in_features": 64}, "weights": "gone.safetensors"}],
                        num_classes=5)
    with pytest.raises(WeightsNotFoundError, match="gone.safetensors"):
        generate(job(ens, arrays), tmp_path / "s")
    _no_complete_store(tmp_path / "s")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_weights(tmp_path, arrays, suffix):
    (tmp_path / f"w{suffix}").write_bytes(os.urandom(4096))
    ens = _ensemble_doc(tmp_path, [{"arch": "mlp", "arch_kwargs": {"in_features": 64}, "weights": f"w{suffix}"}],
                        num_classes=5)
    with pytest.raises(WeightsError):
        generate(job(ens, arrays), tmp_path / "s")
    _no_complete_store(tmp_path / "s")


def test_weights_of_another_architecture(tmp_path, arrays):
    save_weights(build_model("mlp", 5, in_features=64, hidden=[8]), tmp_path / "w.safetensors")
    ens = _ensemble_doc(tmp_path, [{"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]},
                                    "weights": "w.safetensors"}], num_classes=5)
    with pytest.raises(WeightsError, match="does not fit"):
        generate(job(ens, arrays), tmp_path / "s")


def test_misfitting_weights_say_why_in_a_users_terms(tmp_path, arrays):
    """A member whose head has other classes than the ensemble is named with its class count (not torch's
    size-mismatch text, nor a key_map hint); weights of a deeper variant say so."""
    save_weights(build_model("mlp", 10, in_features=64, hidden=[8]), tmp_path / "ten.safetensors")
    save_weights(build_model("mlp", 5, in_features=64, hidden=[8]), tmp_path / "five.safetensors")
    ens = _ensemble_doc(tmp_path, [{"name": "fine", "arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [8]},
                                    "weights": "five.safetensors"},
                                   {"name": "ten_class", "arch": "mlp", "arch_kwargs": {"in_features": 64,
                                                                                        "hidden": [8]},
                                    "weights": "ten.safetensors"}], num_classes=5)
    with pytest.raises(WeightsError) as e:
        generate(job(ens, arrays), tmp_path / "s")
    msg = str(e.value)
    assert "'ten_class'" in msg and "head has 10 classes" in msg and "built for 5" in msg, msg
    assert "num_classes: 10" in msg and "key_map" not in msg and "size mismatch" not in msg, msg
    save_weights(build_model("resnet34", 2), tmp_path / "r34.safetensors")
    ens = _ensemble_doc(tmp_path, [{"name": "r", "arch": "resnet18", "weights": "r34.safetensors"}], num_classes=2)
    with pytest.raises(WeightsError, match="larger variant") as e:
        generate(job(ens, arrays), tmp_path / "s2")
    assert "layer1.2." in str(e.value) and "key_map" not in str(e.value)


class Payload:
    """Unpickling this would call os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("PWNED_MARKER", "/tmp/darkstore-pwned"),))


def test_pickle_carrying_code_is_refused_not_run(tmp_path, arrays, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    state = build_model("mlp", 5, in_features=64).state_dict()
    state["evil"] = Payload()
    torch.save(state, tmp_path / "evil.pt")
    ens = _ensemble_doc(tmp_path, [{"arch": "mlp", "arch_kwargs": {"in_features": 64}, "weights": "evil.pt"}],
                        num_classes=5)
    with pytest.raises(UnsafeWeightsError, match="needs code"):
        generate(job(ens, arrays), tmp_path / "s")
    assert not marker.exists(), "the payload ran"
    _no_complete_store(tmp_path / "s")


def test_plain_state_dict_pt_loads(tmp_path, arrays):
    torch.save({"state_dict": build_model("mlp", 5, in_features=64).state_dict()}, tmp_path / "ok.pt")
    ens = _ensemble_doc(tmp_path, [{"arch": "mlp", "arch_kwargs": {"in_features": 64}, "weights": "ok.pt"}],
                        num_classes=5)
    w = generate(job(ens, arrays), tmp_path / "s")
    assert open_store(w.path).meta.teachers[0].format == "state_dict"


def test_class_count_mismatch(tmp_path, arrays):
    ens = make_ensemble(tmp_path / "t", [
        {"arch": "mlp", "arch_kwargs": {"in_features": 64}, "num_classes": 5},
        {"arch": "mlp", "arch_kwargs": {"in_features": 64}, "num_classes": 7},
    ], num_classes=None)
    with pytest.raises(ClassCountMismatchError, match="t0: 5, t1: 7"):
        generate(job(ens, arrays), tmp_path / "s")
    _no_complete_store(tmp_path / "s")


def test_labels_beyond_class_count(tmp_path, ensemble):
    data = make_arrays(tmp_path / "d.npz", classes=9)
    with pytest.raises(ClassCountMismatchError, match="labels up to 8"):
        generate(job(ensemble, data, chunk_rows=64), tmp_path / "s")
    _no_complete_store(tmp_path / "s")


def test_nan_output_names_member_and_rows(tmp_path, ensemble):
    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 8, 8), dtype=np.float32)
    x[[130, 170]] = np.nan  # e.g. corrupt inputs in the second chunk
    np.savez(tmp_path / "nan.npz", x=x, y=rng.integers(0, 5, 200))
    with pytest.raises(NonFiniteLogitsError, match=r"teacher 't0'.*samples 130, 170 "):
        generate(job(ensemble, tmp_path / "nan.npz", chunk_rows=100), tmp_path / "s")
    r = open_store(tmp_path / "s", allow_incomplete=True)
    assert r.done.tolist() == [True, False]  # the clean chunk is kept, the bad one never marked


def test_unreadable_data_path(tmp_path, ensemble):
    with pytest.raises(DataNotFoundError, match="missing.npz"):
        generate(job(ensemble, tmp_path / "missing.npz"), tmp_path / "s")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        generate(job(ensemble, tmp_path / "garbage.npz"), tmp_path / "s")
    _no_complete_store(tmp_path / "s")


def test_code_formats_need_allow_code(tmp_path, arrays):
    model = build_model("mlp", 5, in_features=64).eval()
    torch.jit.script(model).save(str(tmp_path / "m.ts"))
    ens = _ensemble_doc(tmp_path, [{"name": "ts", "format": "torchscript", "weights": "m.ts"}])
    with pytest.raises(CodeNotAllowedError, match="torchscript"):
        generate(job(ens, arrays), tmp_path / "s")
    w = generate(job(ens, arrays, dtype="float32"), tmp_path / "s", allow_code=True)
    with np.load(arrays) as a, torch.no_grad():
        ref = model(torch.from_numpy(a["x"])).numpy()
    np.testing.assert_allclose(open_store(w.path).read_all().logits, ref - ref.max(-1, keepdims=True), atol=1e-5)

    dyn = {"x": {0: torch.export.Dim("batch", min=2, max=4096)}}
    torch.export.save(torch.export.export(model, (torch.zeros(4, 1, 8, 8),), dynamic_shapes=dyn), str(tmp_path / "m.pt2"))
    exp = _ensemble_doc(tmp_path, [{"name": "ex", "format": "export", "weights": "m.pt2"}])
    with pytest.raises(CodeNotAllowedError, match="export"):
        generate(job(exp, arrays), tmp_path / "s3")
    w = generate(job(exp, arrays, dtype="float32"), tmp_path / "s3", allow_code=True)
    np.testing.assert_allclose(open_store(w.path).read_all().logits, ref - ref.max(-1, keepdims=True), atol=1e-5)

    fac = _ensemble_doc(tmp_path, [{"name": "f", "factory": "os:getcwd"}], num_classes=5)
    with pytest.raises(CodeNotAllowedError, match="factory"):
        generate(job(fac, arrays), tmp_path / "s2")


def test_cli_errors_are_one_clear_line(tmp_path, arrays):
    ens = _ensemble_doc(tmp_path, [{"arch": "nope", "weights": "w.safetensors"}], num_classes=5)
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(ens), "--data", str(arrays), "--out",
                        str(tmp_path / "s")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert "error:" in r.stderr and "nope" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"members": [{"arch": "mlp", "wieghts": "w.safetensors"}]}))
    with pytest.raises(DarkstoreError, match="wieghts"):
        EnsembleSpec.from_file(bad)


def test_torchvision_teacher_with_its_own_preprocessing(tmp_path, arrays):
    """A real torchvision architecture as a member: grayscale 8x8 -> 3 channels, 32x32, normalised."""
    from torchvision.models import get_model

    torch.manual_seed(0)
    tv = get_model("resnet18", weights=None, num_classes=5).eval()
    save_weights(tv, tmp_path / "r18.safetensors")
    pre = {"channels": 3, "resize": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    ens = _ensemble_doc(tmp_path, [{"name": "r18", "arch": "resnet18", "weights": "r18.safetensors",
                                    "preprocess": pre}], num_classes=5)
    w = generate(job(ens, arrays, dtype="float32", chunk_rows=128), tmp_path / "s")
    with np.load(arrays) as a:
        x = torch.from_numpy(a["x"][:20]).expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = tv(x).numpy()
    r = open_store(w.path)
    np.testing.assert_allclose(r.read_all().logits[:20], ref - ref.max(-1, keepdims=True), atol=1e-4)
    assert r.meta.teachers[0].num_params == sum(p.numel() for p in tv.parameters())


def test_factories_run_only_when_allowed(tmp_path):
    ens = _ensemble_doc(tmp_path, [{"name": "f", "factory": "tests.factories:tiny_mlp"}], num_classes=5)
    data = {"kind": "factory", "factory": "tests.factories:digits_like", "kwargs": {"n": 40}}
    spec = job(ens, make_arrays(tmp_path / "a.npz")).model_copy(update={"data": parse_data_spec(data)})
    with pytest.raises(CodeNotAllowedError):
        generate(spec, tmp_path / "s")
    w = generate(spec, tmp_path / "s", allow_code=True)
    r = open_store(w.path)
    assert r.meta.num_rows == 40 and r.meta.teachers[0].format == "factory"
    from tests.factories import digits_like, tiny_mlp

    ds = digits_like(40)
    with torch.no_grad():
        ref = tiny_mlp()(ds.tensors[0]).numpy()
    np.testing.assert_allclose(r.read_all().logits.astype(np.float32), ref - ref.max(-1, keepdims=True), atol=2e-2)
    np.testing.assert_array_equal(r.read_all().labels, ds.tensors[1].numpy())


def test_writer_processes_write_the_same_store(tmp_path, ensemble, arrays):
    """The GPU path's writer processes (forced here on the CPU) commit exactly what threads do."""
    from teacher_service.generate import prepare, run_chunks
    from storage import StoreWriter, open_store as _open

    spec = job(ensemble, arrays, chunk_rows=64, augment={"views": 2, "ops": [{"op": "hflip"}]})
    p = prepare(spec)
    out = {}
    for name, procs in (("threads", False), ("processes", True)):
        w = StoreWriter.open_or_create(tmp_path / name, p.meta)
        assert run_chunks(p, w, w.pending_chunks(), writers=2, max_inflight=4, writer_processes=procs) == 600
        out[name] = _open(tmp_path / name).read_all()
    a, b = out["threads"], out["processes"]
    assert np.array_equal(a.logits, b.logits) and np.array_equal(a.index, b.index) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(_open(tmp_path / "threads").read_field("view_params"),
                          _open(tmp_path / "processes").read_field("view_params"))


def test_key_map_loads_weights_saved_under_other_names(tmp_path, arrays):
    """A plain nn.Sequential MLP (keys 0.*, 2.*) and a DDP-wrapped one (module.net.*) load into the built-in mlp
    with a key_map; without it the error says how; the loaded teacher computes what the original computes."""
    from safetensors.torch import save_file

    from darkstore.models import ModelSpec, load_model

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    builtin = build_model("mlp", 5, in_features=64, hidden=[16])
    save_file({f"module.{k}": v.contiguous() for k, v in builtin.state_dict().items()}, str(tmp_path / "ddp.safetensors"))
    spec = {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [16]}, "num_classes": 5}
    with pytest.raises(WeightsError, match="key_map"):
        load_model(ModelSpec(**spec, weights=str(tmp_path / "plain.safetensors")))
    lm = load_model(ModelSpec(**spec, weights=str(tmp_path / "plain.safetensors"),
                              key_map={"0.": "net.1.", "2.": "net.3."}))
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lm.forward(x), plain(x.flatten(1)), rtol=0, atol=0)
    lm = load_model(ModelSpec(**spec, weights=str(tmp_path / "ddp.safetensors"), key_map={"module.": ""}))
    with torch.no_grad():
        torch.testing.assert_close(lm.forward(x), builtin(x), rtol=0, atol=0)
    # part of the job's identity only when set: keys of jobs without it are unchanged
    from teacher_service.spec import JobSpec

    base = {"teachers": {"members": [{**spec, "weights": "w"}]}, "data": {"kind": "arrays", "path": "x.npz"}}
    mapped = {"teachers": {"members": [{**spec, "weights": "w", "key_map": {"0.": "net.1."}}]},
              "data": {"kind": "arrays", "path": "x.npz"}}
    a, b = JobSpec.model_validate(base), JobSpec.model_validate(mapped)
    assert "key_map" not in json.dumps(a.identity(["h"], "f")) and a.job_key(["h"], "f") != b.job_key(["h"], "f")


# --- generation across machines without a broker: --shard I/N ---------------------------------------
@pytest.mark.parametrize("scheme", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_two_sharded_generate_processes_fill_one_store_computing_each_chunk_once(tmp_path, scheme, request):
    rows_file = tmp_path / "rows-computed"
    ens = _ensemble_doc(tmp_path, [{"name": "slow", "factory": "tests.factories:slow_mlp",
                                    "arch_kwargs": {"delay": 0.05, "rows": str(rows_file)}}], num_classes=5)
    data = make_arrays(tmp_path / "x.npz", n=640)
    env = cli_env()
    if scheme == "s3":
        env.update(request.getfixturevalue("s3_server").env)
        out = f"s3://{request.getfixturevalue('s3_bucket')}/sharded"
    else:
        out = str(tmp_path / "sharded")
    args = [*DARKSTORE, "generate", "--teachers", str(ens), "--data", str(data), "--chunk-rows", "64", "--batch-size",
            "32", "--allow-code", "--out", out]
    # shard 1 starts first and waits for shard 0 to create the store; then both compute at once
    late = subprocess.Popen([*args, "--shard", "1/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = subprocess.run([*args, "--shard", "0/2"], env=env, capture_output=True, text=True, timeout=300)
    said = late.communicate(timeout=300)[0]
    assert first.returncode == 0 and late.returncode == 0, (first.stderr[-2000:], said[-2000:])
    assert len(rows_file.read_bytes()) == 640  # every row computed once, by one shard or the other
    store = open_store(out)
    assert store.complete
    both = first.stdout + first.stderr + said
    assert "store complete" in both and "shard 0/2" in both and "shard 1/2" in both
    # the same store a single process writes
    rows_file.unlink()
    single = subprocess.run([*args[:-1], str(tmp_path / "whole")], env=env, check=True, capture_output=True,
                            text=True)
    assert "store complete" in single.stdout and "store complete" not in single.stderr  # a result, not progress
    assert len(rows_file.read_bytes()) == 640
    whole = open_store(tmp_path / "whole").read_all()
    got = store.read_all()
    for field in ("logits", "labels", "index"):
        np.testing.assert_array_equal(getattr(got, field), getattr(whole, field), err_msg=field)
    # a shard run again finds its part done: nothing computed
    rows_file.unlink()
    again = subprocess.run([*args, "--shard", "1/2"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "shard 1/2 of this job's store is already complete" in again.stdout + again.stderr
    assert not rows_file.exists()


def test_shard_errors_are_clear(tmp_path, arrays, ensemble):
    args = [*DARKSTORE, "generate", "--teachers", str(ensemble), "--data", str(arrays), "--out", str(tmp_path / "s")]
    for bad, says in (("2/2", "0 <= I < N"), ("1", "give I/N"), ("a/b", "give I/N")):
        r = subprocess.run([*args, "--shard", bad], env=cli_env(), capture_output=True, text=True)
        assert r.returncode != 0 and says in r.stderr, r.stderr
    t0 = time.monotonic()
    r = subprocess.run([*args, "--shard", "1/2", "--wait", "1"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "waited 1 s" in r.stderr and "first shard (0/N) creates it" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "s").exists()
    r = subprocess.run([*args, "--shard", "1/2", "--overwrite"], env=cli_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "--overwrite belongs to shard 0/2" in r.stderr, r.stderr


def test_a_model_spec_files_weights_are_relative_to_the_file(tmp_path, monkeypatch):
    """A student's or generalist's spec file reads like an ensemble file: weights relative to the file."""
    from darkstore.modelspec import ModelSpec

    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "student.yaml").write_text(yaml.safe_dump({"arch": "mlp", "weights": "init/w.safetensors"}))
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.from_file("specs/student.yaml")
    assert Path(spec.weights) == tmp_path / "specs" / "init" / "w.safetensors"
