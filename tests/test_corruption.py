"""Checksummed chunks: a committed chunk changed after its commit is a named error, never silent data.

For every row field of a store (logits, members, labels, index, view parameters) a chunk is
swapped with another, truncated, deleted, or overwritten with other (NaN) values through zarr
itself; `inspect --verify`, the reader and `darkstore train` must each stop with an error naming
the chunk and the field, and train must not leave a finished run behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import open_store
from darkstore.errors import DarkstoreError
from storage.errors import CorruptChunkError, NonFiniteLogitsError
from teacher_service.generate import generate

from .conftest import DARKSTORE, cli_env, job, make_arrays, make_ensemble

pytestmark = pytest.mark.slow

CHUNK = 32
# where chunk 1 of each field lives (zarr v3 default chunk keys): members are [M, rows, C]
KEYS = {"logits": "logits/c/1/0", "members": "members/c/0/1/0", "labels": "labels/c/1", "index": "index/c/1",
        "view_params": "view_params/c/1/0"}
OTHER = {k: v.replace("/1", "/2", 1) if k != "members" else "members/c/0/2/0" for k, v in KEYS.items()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corruption")
    data = make_arrays(tmp / "x.npz", n=120)
    ens = make_ensemble(tmp / "t", [{"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [8]}}] * 2)
    store = generate(job(ens, data, chunk_rows=CHUNK, keep_members=True, combine="arithmetic",
                         augment={"views": 2, "ops": [{"op": "hflip", "p": 0.5}]}), tmp / "store").path
    return {"tmp": tmp, "store": Path(store), "data": data}


def damaged(clean, tmp_path, field: str, how: str) -> Path:
    s = tmp_path / "store"
    shutil.copytree(clean["store"], s)
    target = s / KEYS[field]
    if how == "swapped":  # another chunk's valid bytes in this chunk's place
        shutil.copyfile(s / OTHER[field], target)
    elif how == "truncated":
        b = target.read_bytes()
        target.write_bytes(b[: len(b) // 2])
    elif how == "deleted":  # zarr then reads the fill value
        target.unlink()
    elif how == "rewritten":  # other values written through zarr itself: a valid chunk, wrong contents
        arr = zarr.open_array(str(s / field), mode="r+")
        a, b = CHUNK, 2 * CHUNK
        fill = np.nan if arr.dtype.kind == "f" else 0
        if field == "members":
            arr[:, a:b] = np.full(arr[:, a:b].shape, fill, dtype=arr.dtype)
        else:
            arr[a:b] = np.full(arr[a:b].shape, fill, dtype=arr.dtype)
    return s


HOWS = ["swapped", "truncated", "deleted", "rewritten"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("field", list(KEYS))
def test_reader_verify_names_the_chunk_and_field(clean, tmp_path, field, how):
    s = damaged(clean, tmp_path, field, how)
    with pytest.raises((CorruptChunkError, NonFiniteLogitsError)) as e:
        open_store(s).verify()
    assert "chunk 1 " in str(e.value) and f"field {field}" in str(e.value), str(e.value)
    assert "commit mark" in str(e.value)  # says how to repair
    open_store(clean["store"]).verify()  # the untouched store passes


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("field", ["logits", "labels"])
def test_cli_inspect_verify_and_train_refuse_a_damaged_chunk(clean, tmp_path, field, how):
    s = damaged(clean, tmp_path, field, how)
    p = subprocess.run([*DARKSTORE, "inspect", str(s), "--verify"], env=cli_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "chunk 1 " in p.stderr and f"field {field}" in p.stderr, p.stderr
    out = tmp_path / "run"
    p = subprocess.run([*DARKSTORE, "train", "--store", str(s), "--out", str(out), "--student", "mlp",
                        "--arch-kwargs", '{"in_features": 64, "hidden": [8]}', "--epochs", "1"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.stdout[-1500:], p.stderr[-1500:])
    assert "chunk 1 " in p.stderr and f"field {field}" in p.stderr, p.stderr
    assert not (out / "summary.json").exists() and not (out / "student.safetensors").exists()


@pytest.mark.parametrize("field", ["logits", "labels"])
def test_a_damaged_array_metadata_file_is_one_named_error(clean, tmp_path, field):
    """An array's zarr.json that no longer parses: `inspect --verify` and `train` say which file, exit 2."""
    s = tmp_path / "store"
    shutil.copytree(clean["store"], s)
    (s / field / "zarr.json").write_text("{not json")
    for args in (["inspect", str(s), "--verify"],
                 ["train", "--store", str(s), "--out", str(tmp_path / "run"), "--student", "mlp",
                  "--arch-kwargs", '{"in_features": 64, "hidden": [8]}', "--epochs", "1"]):
        p = subprocess.run([*DARKSTORE, *args], env=cli_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and f"{field}/zarr.json" in lines[0] and "generate the store again" in lines[0], lines


def test_checksums_are_recorded_per_chunk_and_field(clean):
    r = open_store(clean["store"])
    assert r.meta.schema_version == 2
    assert r.meta.checksums == ["logits", "members", "labels", "index", "view_params"]
    sums = zarr.open_array(str(clean["store"] / "checksums"), mode="r")[:]
    assert sums.shape == (r.meta.n_chunks, 5) and sums.dtype == np.uint32
    assert len({tuple(row) for row in sums}) == r.meta.n_chunks  # every chunk's bytes differ


def test_a_version_1_store_opens_and_trains_and_refuses_non_finite_targets(clean, tmp_path):
    """Schema 1 (no checksums) still opens; with no checksum to catch it, a NaN chunk is refused on read."""
    s = tmp_path / "v1"
    shutil.copytree(clean["store"], s)
    doc = json.loads((s / "zarr.json").read_text())
    attrs = doc["attributes"]["darkstore"]
    attrs["schema_version"] = 1
    del attrs["checksums"]
    (s / "zarr.json").write_text(json.dumps(doc))
    shutil.rmtree(s / "checksums")
    r = open_store(s)
    assert r.meta.checksums is None
    r.verify()
    damaged_v1 = tmp_path / "v1-nan"
    shutil.copytree(s, damaged_v1)
    arr = zarr.open_array(str(damaged_v1 / "logits"), mode="r+")
    arr[CHUNK:2 * CHUNK] = np.full(arr[CHUNK:2 * CHUNK].shape, np.nan, dtype=arr.dtype)
    with pytest.raises(NonFiniteLogitsError, match="chunk 1 .*field logits"):
        open_store(damaged_v1).read_chunks([1], ["logits"])
    assert issubclass(CorruptChunkError, DarkstoreError)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_fast_finiteness_check_agrees_with_numpy(dtype):
    from storage.fields import all_finite

    rng = np.random.default_rng(0)
    specials = [np.nan, np.inf, -np.inf, np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny, 0.0, -0.0]
    for v in specials:
        for shape in [(7, 5), (3, 4, 6)]:
            x = rng.normal(0, 100, shape).astype(dtype)
            x.flat[rng.integers(x.size)] = v
            for view in (x, x[:, ::2]):  # C-ordered and strided
                assert all_finite(view) == bool(np.isfinite(view).all()), (v, shape)
