"""The Zarr store: round trips, commit marks, completeness, schema checks — each on every scheme
(a local path, file://, memory:// and s3:// on a loopback S3 server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from storage import FLOAT16_FLOOR, Location, StoreMeta, StoreWriter, TeacherRecord, TransferSetRecord, open_store
from storage.errors import (
    CorruptChunkError,
    IncompleteStoreError,
    NonFiniteLogitsError,
    SchemaError,
    StoreExistsError,
    StoreNotFoundError,
)


def meta(n=1000, c=7, rows=128, dtype="float32", members=2, keep=False, key="k" * 64, compressor="zstd"):
    return StoreMeta(
        software_version="test", created_at="now", job_key=key, num_rows=n, num_classes=c, chunk_rows=rows,
        dtype=dtype, compressor=compressor, combine="geometric", temperature=1.0, keep_members=keep,
        teachers=[TeacherRecord(name=f"t{i}", arch="mlp", format="safetensors", num_params=10) for i in range(members)],
        transfer_set=TransferSetRecord(spec={"kind": "arrays", "path": "x.npz"}, fingerprint="f" * 64, num_samples=n),
    )


def centred(rng, shape, scale=8.0):
    x = rng.normal(0, scale, shape)
    return x - x.max(axis=-1, keepdims=True)


def fill(writer: StoreWriter, logits, members=None, chunks=None):
    for i in chunks if chunks is not None else range(writer.meta.n_chunks):
        a, b = writer.bounds(i)
        writer.write_chunk(i, logits=logits[a:b], labels=np.arange(a, b) % writer.meta.num_classes,
                           index=np.arange(a, b), members=None if members is None else members[:, a:b],
                           stats=np.array([b - a, b - a, 0, 1]))


@pytest.mark.parametrize("compressor", ["zstd", "blosc", "none"])
def test_float32_round_trip_is_exact(store_at, compressor):
    rng = np.random.default_rng(0)
    m = meta(n=1000, rows=128, compressor=compressor, keep=True)  # 1000 = 7 full chunks + a partial one
    w = StoreWriter.open_or_create(store_at("s"), m)
    x = centred(rng, (1000, 7)).astype(np.float32)
    mem = centred(rng, (2, 1000, 7)).astype(np.float32)
    fill(w, x, mem)
    r = open_store(store_at("s"))
    assert r.complete
    got = r.read_all(members=True)
    np.testing.assert_array_equal(got.logits, x)
    np.testing.assert_array_equal(got.members, mem)
    np.testing.assert_array_equal(got.index, np.arange(1000))
    rows = rng.permutation(1000)[:50]
    logits, members = r.read_rows(rows, members=True)
    np.testing.assert_array_equal(logits, x[rows])
    np.testing.assert_array_equal(members, mem[:, rows])


def test_float16_round_trip_within_half_ulp(store_at):
    """float16 keeps 11 significant bits: |stored − x| ≤ 2⁻¹¹·|x| (+ subnormal spacing near 0);
    values below the float16 range are clipped to FLOAT16_FLOOR, never −inf."""
    rng = np.random.default_rng(1)
    w = StoreWriter.open_or_create(store_at("s"), meta(n=500, rows=100, dtype="float16"))
    x = centred(rng, (500, 7), scale=30.0)
    x[3, 2] = -1e6  # a class the teacher rules out completely
    fill(w, x)
    got = open_store(store_at("s")).read_all().logits
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert got[3, 2] == np.float16(FLOAT16_FLOOR)
    mask = np.ones_like(x, dtype=bool)
    mask[3, 2] = False
    err = np.abs(got.astype(np.float64) - x)[mask]
    bound = 2.0**-11 * np.abs(x)[mask] + 2.0**-25
    assert (err <= bound).all(), float((err - bound).max())


def test_incomplete_store_is_refused_and_finished_part_readable(store_at):
    rng = np.random.default_rng(2)
    w = StoreWriter.open_or_create(store_at("s"), meta(n=1000, rows=128))
    x = centred(rng, (1000, 7)).astype(np.float32)
    fill(w, x, chunks=[0, 2, 7])
    with pytest.raises(IncompleteStoreError, match="3 of 8 chunks"):
        open_store(store_at("s"))
    r = open_store(store_at("s"), allow_incomplete=True)
    assert not r.complete and r.finished_chunks() == [0, 2, 7]
    rows = r.finished_rows()
    assert rows.tolist() == list(range(0, 128)) + list(range(256, 384)) + list(range(896, 1000))
    np.testing.assert_array_equal(r.read_all().logits, x[rows])
    with pytest.raises(IncompleteStoreError):
        r.read_chunk(1)
    with pytest.raises(IncompleteStoreError):
        r.read_rows(np.array([0, 130]))
    assert w.pending_chunks() == [1, 3, 4, 5, 6]


def test_non_finite_chunk_is_not_committed(store_at):
    w = StoreWriter.open_or_create(store_at("s"), meta(n=256, rows=128))
    x = np.zeros((128, 7), dtype=np.float32)
    x[5, 1] = np.nan
    with pytest.raises(NonFiniteLogitsError, match="rows 5"):
        w.write_chunk(0, logits=x, labels=np.zeros(128), index=np.arange(128))
    assert not w.done_mask().any()


def test_accuracy_is_derived_from_committed_stats(store_at):
    w = StoreWriter.open_or_create(store_at("s"), meta(n=256, rows=128))
    z = np.zeros((128, 7), dtype=np.float32)
    w.write_chunk(0, logits=z, labels=np.zeros(128), index=np.arange(128), stats=np.array([100, 90, 80, 70]))
    w.write_chunk(1, logits=z, labels=np.zeros(128), index=np.arange(128, 256), stats=np.array([100, 50, 40, 30]))
    acc = open_store(store_at("s")).accuracy()
    assert acc == {"ensemble": 0.7, "t0": 0.6, "t1": 0.5, "labeled_rows": 200}


def test_reopen_same_job_resumes_other_job_refused(store_at):
    w = StoreWriter.open_or_create(store_at("s"), meta(key="a" * 64))
    fill(w, np.zeros((1000, 7), np.float32), chunks=[0])
    again = StoreWriter.open_or_create(store_at("s"), meta(key="a" * 64))
    assert again.pending_chunks() == list(range(1, 8))
    with pytest.raises(StoreExistsError, match="another job"):
        StoreWriter.open_or_create(store_at("s"), meta(key="b" * 64))
    fresh = StoreWriter.open_or_create(store_at("s"), meta(key="b" * 64), overwrite=True)
    assert fresh.pending_chunks() == list(range(8))
    other = Location.parse(store_at("other"))
    other.write_bytes("precious.txt", b"keep me")
    with pytest.raises(StoreExistsError, match="not a darkstore store"):
        StoreWriter.open_or_create(store_at("other"), meta())
    assert other.read_bytes("precious.txt") == b"keep me"


def test_schema_checks(store_at):
    with pytest.raises(StoreNotFoundError):
        open_store(store_at("nothing"))
    w = StoreWriter.open_or_create(store_at("s"), meta())
    fill(w, np.zeros((1000, 7), np.float32))
    loc = Location.parse(store_at("s"))
    doc = json.loads(loc.read_bytes("zarr.json"))
    doc["attributes"]["darkstore"]["schema_version"] = 99
    loc.write_bytes("zarr.json", json.dumps(doc).encode())
    with pytest.raises(SchemaError, match="schema version 99"):
        open_store(store_at("s"))
    doc["attributes"]["darkstore"]["schema_version"] = 1
    doc["attributes"]["darkstore"]["num_classes"] = 8
    loc.write_bytes("zarr.json", json.dumps(doc).encode())
    with pytest.raises(SchemaError, match="logits"):
        open_store(store_at("s"))


def test_errors_inherit_builtins():
    assert issubclass(StoreNotFoundError, FileNotFoundError)
    assert issubclass(IncompleteStoreError, RuntimeError)


class Crash(BaseException):
    """A process killed mid-creation (not an Exception: nothing may catch it)."""


def test_a_creation_killed_midway_leaves_no_store_and_is_replaced(store_at, monkeypatch):
    """Object stores have no rename: the attributes go last, after a creation marker, so a creation
    killed after its arrays is not a store, is said to be unfinished, and the next creation replaces it."""
    import storage._zarr as z

    real = z.create_arrays

    def arrays_then_crash(group, m, compressors):
        real(group, m, compressors)
        raise Crash

    monkeypatch.setattr(z, "create_arrays", arrays_then_crash)
    with pytest.raises(Crash):
        StoreWriter.open_or_create(store_at("s"), meta())
    monkeypatch.setattr(z, "create_arrays", real)
    with pytest.raises(StoreNotFoundError, match="did not finish|no zarr.json"):
        open_store(store_at("s"))
    w = StoreWriter.open_or_create(store_at("s"), meta())  # no --overwrite needed
    fill(w, np.zeros((1000, 7), np.float32))
    assert open_store(store_at("s")).complete
    assert not Location.parse(store_at("s")).exists(z.CREATING)


def test_store_summary_counts_bytes_on_every_scheme(store_at):
    w = StoreWriter.open_or_create(store_at("s"), meta(n=256, rows=128))
    fill(w, centred(np.random.default_rng(3), (256, 7)).astype(np.float32))
    s = open_store(store_at("s")).summary()
    assert s["path"] == str(Location.parse(store_at("s")))
    assert 256 * 7 * 4 * 0.5 < s["disk_bytes"] < 256 * 7 * 4 * 4  # zstd on random floats: about the raw size


def test_a_new_field_is_one_declaration_plus_its_producer_and_consumer(store_at, monkeypatch):
    """What a newcomer does to store, say, cached teacher features: declare the field in storage/fields.py,
    hand the writer its array, read it back. Creation, validation, checksums and reads need no other change."""
    import storage.fields as F

    feats = F.FieldSpec("features", ("row", "feature"), lambda m: (m.num_rows, 3), lambda m: "float32", np.nan,
                        lambda m: True, doc="cached teacher features")
    monkeypatch.setattr(F, "FIELDS", (*F.FIELDS[:-3], feats, *F.FIELDS[-3:]))
    monkeypatch.setitem(F.BY_NAME, "features", feats)
    rng = np.random.default_rng(4)
    w = StoreWriter.open_or_create(store_at("s"), meta(n=300, rows=128))
    assert w.meta.checksums == ["logits", "labels", "index", "features"]
    x, f = centred(rng, (300, 7)).astype(np.float32), rng.normal(size=(300, 3))
    for i in range(w.meta.n_chunks):
        a, b = w.bounds(i)
        with pytest.raises(SchemaError, match="needs features="):  # the producer must provide it
            w.write_chunk(i, logits=x[a:b], labels=np.zeros(b - a), index=np.arange(a, b))
        w.write_chunk(i, logits=x[a:b], labels=np.zeros(b - a), index=np.arange(a, b), features=f[a:b])
    r = open_store(store_at("s"))  # validated on open like the others
    rows = np.array([299, 3, 140])
    np.testing.assert_array_equal(r.read(rows, ["features"])["features"], f[rows].astype(np.float32))
    r.verify()
    loc = Location.parse(store_at("s"))
    loc.write_bytes("features/c/1/0", loc.read_bytes("features/c/0/0"))  # checksummed like every row field
    with pytest.raises(CorruptChunkError, match="chunk 1 .*field features"):
        open_store(store_at("s")).read(rows, ["features"])


def test_stored_ids_take_the_narrowest_integer_that_holds_the_vocabulary():
    from types import SimpleNamespace

    from storage.kinds import kind_of

    def index_dtype(**meta):
        m = SimpleNamespace(**meta)
        return kind_of(m).index_dtype(m)

    assert index_dtype(sequence=None, num_classes=10) == "int32"  # classes: as always
    assert index_dtype(sequence=object(), num_classes=65_536) == "uint16"
    assert index_dtype(sequence=object(), num_classes=152_064) == "int32"  # no 2^17 cap
