"""Content fingerprints that cost a directory listing, not a read of the whole set, after the first time.

A transfer set's fingerprint is a sha256 over its content (see :mod:`darkstore.data`); computed from
scratch it reads every byte, which on an ImageNet-size folder takes minutes in every process that opens
it. A :class:`FingerprintPolicy` with a ``cache_dir`` keeps a *manifest* there:

- **image folders**: every file's size, mtime and sha256. An open stats every file (the listing does that
  anyway), takes the digest of each unchanged file from the manifest, hashes only new or changed files (in
  threads), and re-reads ``sample`` unchanged files picked at random to check that the manifest still tells
  the truth — one mismatch and every file is hashed again. ``verify="full"`` hashes every file.
- **arrays files and torchvision roots**: the whole fingerprint, kept while the size and mtime of every
  file under the root are unchanged (``verify="full"`` recomputes it).
- **factory sets** (user code) are never cached: nothing says what they read.

The fingerprint's *value* is the same with or without a manifest; a manifest only saves the reading.
Files modified within two seconds of being recorded are not trusted next time (their mtime may not have
ticked), and a lock file keeps concurrent processes (DDP ranks, sweep points) from hashing the set together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
RACY_NS = 2_000_000_000  # an mtime this close to the recording time may not have ticked since


class FingerprintPolicy(BaseModel):
    """How transfer sets are fingerprinted: from scratch (no ``cache_dir``) or through a manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    cache_dir: Path | None = Field(None, description="where manifests are kept; None: hash everything every time")
    verify: Literal["quick", "full"] = Field("quick", description="quick: unchanged files (size, mtime) keep their "
                                             "recorded digest, `sample` of them re-read; full: hash every file")
    sample: int = Field(32, ge=0, description="unchanged files re-read on a quick check")
    workers: int = Field(default_factory=lambda: min(8, os.cpu_count() or 1), ge=1,
                         description="threads hashing files")
    progress: Callable[[int, int], None] | None = Field(None, exclude=True,
                                                        description="called with (bytes hashed, bytes to hash)")


@dataclass
class FingerprintReport:
    """What computing one fingerprint cost: how many files were hashed, how many taken from a manifest."""

    files: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    from_manifest: int = 0
    sampled: int = 0
    stale: bool = False  # a sampled file did not match its manifest entry: everything was hashed again
    seconds: float = 0.0
    manifest: str | None = None


# --- hashing files ---------------------------------------------------------------------------------------
def file_digest(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _hash_all(paths: Sequence[str], sizes: Sequence[int], policy: FingerprintPolicy) -> list[bytes]:
    """sha256 of each file, in threads (hashlib releases the GIL), reporting progress by bytes."""
    total, done = int(sum(sizes)), 0
    if policy.progress:
        policy.progress(0, total)
    out: list[bytes] = []
    with ThreadPoolExecutor(policy.workers) as ex:
        for d, n in zip(ex.map(file_digest, paths), sizes):
            out.append(d)
            done += int(n)
            if policy.progress and (len(out) % 256 == 0 or len(out) == len(paths)):
                policy.progress(done, total)
    return out


def stat_files(paths: Sequence[str], workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime_ns) of each file; stats run in threads (they release the GIL, which network file
    systems reward)."""
    def one(p: str) -> tuple[int, int]:
        st = os.stat(p)
        return st.st_size, st.st_mtime_ns

    if len(paths) < 4096 or workers == 1:
        pairs = [one(p) for p in paths]
    else:
        with ThreadPoolExecutor(workers) as ex:
            pairs = list(ex.map(one, paths))
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0].copy(), arr[:, 1].copy()


# --- the manifest -----------------------------------------------------------------------------------------
def _manifest_path(cache_dir: Path, kind: str, key: str) -> Path:
    return cache_dir / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (processes that open the same set wait for the one hashing it);
    where the cache cannot be written or the file system refuses locks, go on without."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_suffix(".lock"), "a")
    except OSError as exc:
        log.warning("fingerprint cache %s cannot be written (%s): hashing without a manifest", path.parent, exc)
        yield
        return
    with f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def _load(path: Path, key: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as exc:  # noqa: BLE001 — a torn or foreign file: recompute, never trust it
        log.warning("ignoring unreadable fingerprint manifest %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    head = json.loads(bytes(data.get("head", np.zeros(0, np.uint8))).decode() or "{}")
    if head.get("version") != MANIFEST_VERSION or head.get("key") != key:
        return None
    return data


def _save(path: Path, key: str, **arrays: np.ndarray) -> None:
    head = np.frombuffer(json.dumps({"version": MANIFEST_VERSION, "key": key}).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, head=head, **arrays)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache is a slow start-up, not an error
        log.warning("cannot write the fingerprint manifest %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _untrusted(mtimes: np.ndarray, now_ns: int) -> np.ndarray:
    return mtimes >= now_ns - RACY_NS


def folder_digests(root: Path, relpaths: Sequence[str], policy: FingerprintPolicy, report: FingerprintReport,
                   stats: tuple[np.ndarray, np.ndarray] | None = None) -> list[bytes]:
    """The sha256 of every file ``root/relpath``, through ``policy``'s manifest when it has a cache.
    ``stats``: the files' (sizes, mtimes_ns) when the caller has them from its listing."""
    t0 = time.perf_counter()
    paths = [os.path.join(root, r) for r in relpaths]
    sizes, mtimes = stats if stats is not None else stat_files(paths, policy.workers)
    report.files = len(paths)
    if policy.cache_dir is None:
        out = _hash_all(paths, sizes, policy)
        report.hashed, report.hashed_bytes = len(out), int(sizes.sum())
        report.seconds = time.perf_counter() - t0
        return out
    key = f"folder:{Path(root).resolve()}"
    mpath = _manifest_path(Path(policy.cache_dir), "folder", key)
    report.manifest = str(mpath)
    with _locked(mpath):
        old = _load(mpath, key) if policy.verify == "quick" else None
        digests: list[bytes | None] = [None] * len(paths)
        if old is not None:
            where = {p: i for i, p in enumerate(bytes(old["paths"]).decode().split("\0"))} if len(old["size"]) else {}
            for i, rel in enumerate(relpaths):
                j = where.get(rel)
                if j is not None and old["size"][j] == sizes[i] and old["mtime"][j] == mtimes[i]:
                    digests[i] = old["digest"][j].tobytes()
        known = [i for i, d in enumerate(digests) if d is not None]
        if known and policy.sample:
            pick = np.random.default_rng().choice(known, size=min(policy.sample, len(known)), replace=False)
            report.sampled = len(pick)
            with ThreadPoolExecutor(policy.workers) as ex:
                fresh = list(ex.map(file_digest, [paths[i] for i in pick]))
            if any(f != digests[i] for f, i in zip(fresh, pick)):
                log.warning("the fingerprint manifest of %s is stale (a file changed without changing its size or "
                            "mtime): hashing every file again", root)
                report.stale = True
                digests = [None] * len(paths)
        todo = [i for i, d in enumerate(digests) if d is None]
        report.from_manifest = len(paths) - len(todo)
        if todo:
            for i, d in zip(todo, _hash_all([paths[i] for i in todo], sizes[todo], policy)):
                digests[i] = d
            report.hashed, report.hashed_bytes = len(todo), int(sizes[todo].sum())
        if todo or old is None or len(old["size"]) != len(paths):
            keep_size = np.where(_untrusted(mtimes, time.time_ns()), -1, sizes)
            _save(mpath, key, paths=np.frombuffer("\0".join(relpaths).encode(), dtype=np.uint8), size=keep_size,
                  mtime=mtimes, digest=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32))
    report.seconds = time.perf_counter() - t0
    return digests  # type: ignore[return-value]


def cached_whole(kind: str, key: str, files: Sequence[str], compute: Callable[[], str], policy: FingerprintPolicy,
                 report: FingerprintReport) -> str:
    """A whole-set fingerprint kept while every one of ``files`` keeps its size and mtime."""
    t0 = time.perf_counter()
    report.files = len(files)
    if policy.cache_dir is None:
        fp = compute()
        report.hashed, report.seconds = len(files), time.perf_counter() - t0
        return fp
    sizes, mtimes = stat_files(files, policy.workers)
    names = "\0".join(files)
    sig = hashlib.sha256(names.encode() + sizes.tobytes() + mtimes.tobytes()).hexdigest()
    mpath = _manifest_path(Path(policy.cache_dir), kind, key)
    report.manifest = str(mpath)
    with _locked(mpath):
        old = _load(mpath, key) if policy.verify == "quick" else None
        if old is not None and bytes(old["signature"]).decode() == sig:
            report.from_manifest = len(files)
            report.seconds = time.perf_counter() - t0
            return bytes(old["fingerprint"]).decode()
        fp = compute()
        report.hashed, report.hashed_bytes = len(files), int(sizes.sum())
        if not _untrusted(mtimes, time.time_ns()).any():
            _save(mpath, key, signature=np.frombuffer(sig.encode(), dtype=np.uint8),
                  fingerprint=np.frombuffer(fp.encode(), dtype=np.uint8))
    report.seconds = time.perf_counter() - t0
    return fp


def files_under(root: Path) -> list[str]:
    """Every regular file under ``root`` (a file itself: just it), sorted, as absolute paths."""
    if root.is_file():
        return [str(root)]
    out = []
    for d, _, names in os.walk(root):
        out.extend(os.path.join(d, n) for n in names)
    return sorted(out)
