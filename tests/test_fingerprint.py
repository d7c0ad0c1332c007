"""Fingerprint manifests: the same fingerprint as hashing everything, without reading unchanged files again."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from darkstore.transfer import open_transfer_set
from darkstore.fingerprint import FingerprintPolicy

from .test_data import write_images

PAST = time.time() - 3600  # files older than the manifest's racy window


def age(root: Path, when: float = PAST) -> Path:
    """Set every file's mtime to ``when`` (a real data set is not written in the second it is read)."""
    for d, _, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(d, n), (when, when), follow_symlinks=False)
    return root


def folder(tmp_path, **kw) -> Path:
    return age(write_images(tmp_path / "imgs", **kw))


def opened(root: Path, policy: FingerprintPolicy | None = None, **spec):
    ds = open_transfer_set({"kind": "image_folder", "root": str(root), **spec}, fingerprints=policy)
    ds.fingerprint  # noqa: B018 — computes it, filling the report
    return ds


def reference(root: Path, spec_shape: list) -> str:
    """The fingerprint from its definition: the header, then per file of ``sorted(rglob)`` under each class
    folder its relative path, label and sha256."""
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    files = [(f, c) for c, d in enumerate(classes) for f in sorted(d.rglob("*"))
             if f.is_file() and f.suffix.lower() in (".png", ".jpg")]
    h = hashlib.sha256(f"darkstore-transfer-set-v1:{len(files)}".encode())
    h.update(json.dumps(spec_shape).encode())
    for f, c in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{c}\0".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def test_listing_and_value_follow_the_definition(tmp_path):
    """Nested folders, hidden files, upper-case suffixes, other files and symlinks: the listing is the sorted
    rglob's and the value the definition's, with and without a manifest."""
    root = write_images(tmp_path / "imgs", n_per_class=2)
    rng = np.random.default_rng(1)
    for sub in ("cat/a/b", "cat/Z", "dog/.hidden"):
        (root / sub).mkdir(parents=True)
        for name in ("1.png", "10.PNG", "2.png", ".h.png", ".png"):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / sub / name, format="PNG")
        (root / sub / "notes.txt").write_text("not an image")
    (root / "eel" / "link.png").symlink_to(root / "cat" / "000.png")
    (root / "eel" / "linked_dir").symlink_to(root / "cat" / "a")  # not entered, as rglob does not
    age(root)
    want = reference(root, ["L", None, ["cat", "dog", "eel"]])
    plain = opened(root, mode="L")
    cached = FingerprintPolicy(cache_dir=tmp_path / "cache")
    first, again = opened(root, cached, mode="L"), opened(root, cached, mode="L")
    assert plain.fingerprint == first.fingerprint == again.fingerprint == want
    assert [str(p) for p, _ in plain.samples] == [str(f) for d in sorted(root.iterdir()) if d.is_dir()
                                                  for f in sorted(d.rglob("*")) if f.is_file()
                                                  and f.suffix.lower() == ".png"]
    assert (first.fingerprint_report.hashed, again.fingerprint_report.hashed) == (len(plain), 0)


def test_unchanged_files_are_not_read_again(tmp_path):
    root = folder(tmp_path, n_per_class=20)
    policy = FingerprintPolicy(cache_dir=tmp_path / "cache", sample=5)
    first = opened(root, policy)
    assert (first.fingerprint_report.hashed, first.fingerprint_report.from_manifest) == (60, 0)
    again = opened(root, policy)
    rep = again.fingerprint_report
    assert again.fingerprint == first.fingerprint
    assert (rep.hashed, rep.from_manifest, rep.sampled, rep.stale) == (0, 60, 5, False)
    assert len(list((tmp_path / "cache").glob("folder-*.npz"))) == 1


def test_a_changed_file_is_hashed_again_and_only_it(tmp_path):
    root = folder(tmp_path)
    policy = FingerprintPolicy(cache_dir=tmp_path / "cache")
    before = opened(root, policy).fingerprint
    img = root / "dog" / "002.png"
    a = np.array(Image.open(img))
    a[0, 0] ^= 1
    Image.fromarray(a).save(img)
    age(root, PAST + 10)  # the edit's mtime, old enough to trust
    after = opened(root, policy)
    assert after.fingerprint != before
    assert after.fingerprint == opened(root).fingerprint  # what hashing everything says
    assert after.fingerprint_report.hashed == 18  # every mtime moved (age): all re-read, none trusted blindly
    os.utime(img, (PAST + 20, PAST + 20))
    assert opened(root, policy).fingerprint_report.hashed == 1


def test_a_sampled_mismatch_rehashes_everything_and_full_always_does(tmp_path):
    """Content changed behind an unchanged size and mtime: a quick check that re-reads the file notices and
    hashes the whole set again; one that does not sample it keeps the old value — which is why the full check
    exists."""
    root = folder(tmp_path)
    cache = tmp_path / "cache"
    before = opened(root, FingerprintPolicy(cache_dir=cache)).fingerprint
    img = root / "eel" / "004.png"
    st = img.stat()
    data = bytearray(img.read_bytes())
    data[-20] ^= 0xFF  # inside the zlib stream's checksum region: same size, other bytes
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    truth = opened(root).fingerprint
    assert truth != before
    blind = opened(root, FingerprintPolicy(cache_dir=cache, sample=0))
    assert blind.fingerprint == before and blind.fingerprint_report.hashed == 0
    full = opened(root, FingerprintPolicy(cache_dir=cache, sample=0, verify="full"))
    assert full.fingerprint == truth and full.fingerprint_report.hashed == 18
    # back to the old manifest's content, then a quick check that samples every file finds it stale
    before_again = opened(root, FingerprintPolicy(cache_dir=tmp_path / "cache2"))
    img.write_bytes(bytes(data[:-20]) + bytes([data[-20] ^ 0xFF]) + bytes(data[-19:]))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert before_again.fingerprint == truth
    checked = opened(root, FingerprintPolicy(cache_dir=tmp_path / "cache2", sample=100))
    assert checked.fingerprint_report.stale and checked.fingerprint_report.hashed == 18
    assert checked.fingerprint == before


def test_files_written_just_now_are_not_trusted_next_time(tmp_path):
    """An mtime within two seconds of being recorded may not tick on a later write: such files are hashed
    again at the next open, and trusted once they are older."""
    root = write_images(tmp_path / "imgs")
    policy = FingerprintPolicy(cache_dir=tmp_path / "cache", sample=0)
    for _ in range(2):
        age(root, time.time())  # written now (each open follows within far less than two seconds)
        assert opened(root, policy).fingerprint_report.hashed == 18
    age(root)
    assert opened(root, policy).fingerprint_report.hashed == 18
    assert opened(root, policy).fingerprint_report.hashed == 0


def test_a_torn_manifest_is_recomputed_not_trusted(tmp_path, caplog):
    root = folder(tmp_path)
    policy = FingerprintPolicy(cache_dir=tmp_path / "cache")
    fp = opened(root, policy).fingerprint
    (manifest,) = (tmp_path / "cache").glob("folder-*.npz")
    manifest.write_bytes(manifest.read_bytes()[:100])
    again = opened(root, policy)
    assert again.fingerprint == fp and again.fingerprint_report.hashed == 18
    assert "unreadable fingerprint manifest" in caplog.text
    assert opened(root, policy).fingerprint_report.hashed == 0  # rewritten whole


def _open_in_child(root: str, cache: str, out: str) -> None:
    ds = open_transfer_set({"kind": "image_folder", "root": root},
                           fingerprints=FingerprintPolicy(cache_dir=cache, sample=0))
    Path(out).write_text(json.dumps([ds.fingerprint, ds.fingerprint_report.hashed]))


def test_processes_opening_one_set_at_once_hash_it_once(tmp_path):
    """DDP ranks and sweep points start together: one hashes, the others wait for its manifest."""
    root = folder(tmp_path, n_per_class=200, size=64)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_open_in_child, args=(str(root), str(tmp_path / "cache"), str(tmp_path / f"{i}.json")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)]
    assert len({fp for fp, _ in got}) == 1
    assert sorted(n for _, n in got) == [0, 0, 600]


def test_arrays_and_torchvision_sets_keep_their_fingerprint_while_files_stay(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x, y=np.arange(50) % 3)
    age(tmp_path)
    policy = FingerprintPolicy(cache_dir=tmp_path / "cache")
    spec = {"kind": "arrays", "path": str(tmp_path / "x.npz")}
    fresh = open_transfer_set(spec).fingerprint
    first, again = (open_transfer_set(spec, fingerprints=policy) for _ in range(2))
    assert first.fingerprint == fresh and first.fingerprint_report.from_manifest == 0
    assert again.fingerprint == fresh and again.fingerprint_report.from_manifest == 1
    np.savez(tmp_path / "x.npz", x=x + 1, y=np.arange(50) % 3)
    age(tmp_path, PAST + 5)
    changed = open_transfer_set(spec, fingerprints=policy)
    assert changed.fingerprint == open_transfer_set(spec).fingerprint != fresh
    assert changed.fingerprint_report.from_manifest == 0
    # torchvision's own ImageFolder from a local root: a decoded-sample fingerprint, kept per root
    root = folder(tmp_path / "tv")
    tv = {"kind": "torchvision", "name": "ImageFolder", "root": str(root)}
    fresh = open_transfer_set(tv).fingerprint
    first, again = (open_transfer_set(tv, fingerprints=policy) for _ in range(2))
    assert first.fingerprint == again.fingerprint == fresh
    assert (first.fingerprint_report.from_manifest, again.fingerprint_report.from_manifest) == (0, 18)
    (root / "cat" / "000.png").unlink()
    assert open_transfer_set(tv, fingerprints=policy).fingerprint_report.from_manifest == 0


@pytest.mark.parametrize("verify", ["quick", "full"])
def test_a_cache_that_cannot_be_written_slows_start_up_but_is_no_error(tmp_path, verify, caplog):
    root = folder(tmp_path)
    (tmp_path / "not-a-dir").write_text("")
    ds = opened(root, FingerprintPolicy(cache_dir=tmp_path / "not-a-dir" / "cache", verify=verify))
    assert ds.fingerprint == opened(root).fingerprint and ds.fingerprint_report.hashed == 18
    assert "cannot be written" in caplog.text


@pytest.mark.slow
def test_cli_keeps_a_manifest_and_refuses_a_set_changed_behind_it(tmp_path):
    """`generate` and `train` fingerprint through $DARKSTORE_CACHE's manifest; a file changed behind its size
    and mtime is caught by the sampled re-read (and by --verify-data full), so the trainer refuses the set
    instead of pairing wrong targets with it."""
    import subprocess

    from .conftest import DARKSTORE, cli_env, make_ensemble

    root = folder(tmp_path, n_per_class=10)
    ens = make_ensemble(tmp_path / "t", [{"arch": "small_cnn", "arch_kwargs": {"in_channels": 3, "width": 4}}],
                        num_classes=3)
    env = {**cli_env(), "DARKSTORE_CACHE": str(tmp_path / "cache")}

    def cli(*args, expect=0):
        p = subprocess.run([*DARKSTORE, *args], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == expect, p.stderr[-2000:]
        return p

    cli("generate", "--teachers", str(ens), "--data", str(root), "--out", str(tmp_path / "store"), "--chunk-rows", "10")
    (manifest,) = (tmp_path / "cache" / "fingerprints").glob("folder-*.npz")
    with np.load(manifest) as z:
        assert len(z["size"]) == 30 and (z["size"] > 0).all()
    train = ("train", "--store", str(tmp_path / "store"), "--student", "small_cnn", "--arch-kwargs",
             '{"in_channels": 3, "width": 2}', "--epochs", "1", "--holdout", "0.2")
    cli(*train, "--out", str(tmp_path / "run1"))
    img = root / "dog" / "003.png"
    st, data = img.stat(), bytearray(img.read_bytes())
    data[-20] ^= 0xFF
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    p = cli(*train, "--out", str(tmp_path / "run2"), expect=2)  # the default sample (32) covers all 30 files
    assert "fingerprint" in p.stderr and "differs" in p.stderr
    p = cli(*train, "--out", str(tmp_path / "run3"), "--verify-data", "full", expect=2)
    assert "differs" in p.stderr
