"""Where a store lives: a local path, or a URL (``file://``, ``s3://``, ``memory://``).

Zarr reads and writes the arrays through its own store classes: ``LocalStore`` for local
paths, ``FsspecStore`` for the rest. Beside the arrays darkstore needs only a handful of object
operations (does ``zarr.json`` exist, read or write one small object, remove a prefix, count
bytes); :class:`Location` gives them for every scheme through fsspec, so no code above this
module tests for a scheme.

Why fsspec/s3fs rather than obstore: zarr's ``FsspecStore`` is its longest-serving remote
store; one library gives ``s3://``, a process-wide ``memory://`` (a store written under a name
can be reopened by that name, which the tests use) and, by installing gcsfs or adlfs, Google
and Azure buckets behind the same code; and s3fs takes credentials from botocore's standard
chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ``~/.aws``,
instance roles, ``AWS_ENDPOINT_URL`` for S3-compatible servers). Credentials never travel in a
job spec or a store URL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from .errors import StoreAccessError, StoreURLError

#: what each scheme is; anything else is refused by :meth:`Location.parse`
SCHEMES = {
    "file": "a local path, or file:///absolute/path",
    "s3": "s3://bucket/prefix — S3 or an S3-compatible server (credentials and AWS_ENDPOINT_URL from the "
          "AWS environment); needs s3fs: pip install 'darkstore[s3]'",
    "memory": "memory://name — in this process's memory only (tests)",
}
_URLISH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@dataclass(frozen=True)
class Location:
    """A parsed store location. ``str(loc)`` is its canonical spelling: the plain path for a local
    store (absolute or as given), ``s3://bucket/key`` or ``memory://name`` otherwise."""

    scheme: str  # file | s3 | memory
    path: str  # file: the local path; s3: bucket/key; memory: name (no leading slash)

    # -- parsing --------------------------------------------------------------------
    @classmethod
    def parse(cls, where: "str | Path | Location") -> "Location":
        if isinstance(where, Location):
            return where
        if isinstance(where, Path):
            return cls("file", str(where))
        s = str(where)
        if not s or "\x00" in s:
            raise StoreURLError(f"store location {s[:200]!r} is empty or contains a NUL byte")
        if "://" not in s:
            m = _URLISH.match(s)
            if m and m.group(1).lower() in set(SCHEMES) | {"gs", "gcs", "az", "abfs", "http", "https"}:
                raise StoreURLError(f"store location {s!r} looks like a URL without '//' (write {m.group(1)}://…)")
            return cls("file", s)
        parts = urlsplit(s)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise StoreURLError(f"store location {s!r}: unknown scheme {scheme!r}; darkstore stores live at "
                                + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items()))
        if parts.query or parts.fragment:
            raise StoreURLError(f"store location {s!r}: a store URL has no ?query or #fragment (credentials come "
                                "from the environment, never from the URL)")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise StoreURLError(f"store location {s!r}: file URLs name a local absolute path, "
                                    "file:///path (no host)")
            return cls("file", parts.path)
        if "@" in parts.netloc:
            raise StoreURLError(f"store location {s!r}: credentials in a URL are refused; they come from the "
                                "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws)")
        key = parts.path.strip("/")
        if scheme == "s3" and not parts.netloc:
            raise StoreURLError(f"store location {s!r} names no bucket (s3://bucket/prefix)")
        path = "/".join(p for p in (parts.netloc, key) if p)
        if not path or any(seg in (".", "..") for seg in path.split("/")):
            raise StoreURLError(f"store location {s!r}: empty, '.' or '..' segments are refused")
        return cls(scheme, path)

    def __str__(self) -> str:
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.path}"

    def absolute(self) -> "Location":
        """A local path made absolute (``~`` and symlinks resolved); a URL as it is."""
        return Location("file", str(Path(self.path).expanduser().resolve())) if self.scheme == "file" else self

    # -- naming -----------------------------------------------------------------------
    @property
    def local(self) -> Path | None:
        """The local path, or None for a remote location."""
        return Path(self.path) if self.scheme == "file" else None

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def child(self, *names: str) -> "Location":
        if self.scheme == "file":
            return Location("file", str(Path(self.path, *names)))
        return Location(self.scheme, "/".join([self.path.rstrip("/"), *names]))

    # -- zarr and objects ---------------------------------------------------------------
    def zarr_store(self, *, read_only: bool) -> Any:
        """Zarr's own store class for this location."""
        from zarr.storage import FsspecStore, LocalStore

        if self.scheme == "file":
            return LocalStore(self.path, read_only=read_only)
        self.fs  # a missing s3fs is a clear error here, not deep in zarr
        return FsspecStore.from_url(str(self), read_only=read_only, storage_options=_options(self.scheme))

    @cached_property
    def fs(self) -> Any:
        import fsspec

        try:
            return fsspec.filesystem(self.scheme, **_options(self.scheme))
        except ImportError as exc:
            raise StoreURLError(f"{self.scheme}:// stores need an extra package ({exc}); "
                                "install it with: pip install 'darkstore[s3]'") from exc

    def _key(self, key: str = "") -> str:
        base = self.path if self.scheme != "memory" else "/" + self.path
        return f"{base.rstrip('/')}/{key}" if key else base

    def exists(self, key: str = "") -> bool:
        """Whether the object ``key`` (or, with no key, anything at this location) exists."""
        if self.scheme == "file":  # one stat, no filesystem object (the service lists a page of jobs with it)
            return os.path.exists(self._key(key))
        with _access(self):
            return bool(self.fs.exists(self._key(key)))

    def is_empty(self) -> bool:
        """True when nothing is stored at or below this location."""
        with _access(self):
            if self.scheme == "file":
                p = Path(self.path)
                return not p.exists() or (p.is_dir() and not any(p.iterdir()))
            return not self.fs.exists(self._key()) or not self.fs.find(self._key(), maxdepth=None)

    def read_bytes(self, key: str) -> bytes | None:
        """An object's bytes, or None when it does not exist."""
        with _access(self):
            try:
                return self.fs.cat_file(self._key(key))
            except (FileNotFoundError, NotADirectoryError):
                return None

    def write_bytes(self, key: str, data: bytes) -> None:
        with _access(self):
            if self.scheme == "file":
                Path(self._key(key)).parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.pipe_file(self._key(key), data)
            except FileNotFoundError as exc:  # on S3: the bucket does not exist
                if self.scheme == "file":
                    raise
                raise StoreAccessError(f"cannot write to {self}: its bucket does not exist ({exc}); create it "
                                       "first (darkstore never creates buckets)") from exc

    def remove(self, key: str = "") -> None:
        """Delete the object ``key``, or with no key everything at this location (absent is fine)."""
        with _access(self):
            target = self._key(key)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=not key)

    def size_bytes(self) -> int:
        """Bytes stored at or below this location."""
        with _access(self):
            if self.scheme == "file":
                return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())
            return int(self.fs.du(self._key(), total=True))


def canonical(where: "str | Path | Location") -> str:
    """How a store is recorded (run summaries, sweep plans, job records): a local path made absolute,
    a URL as parsed."""
    return str(Location.parse(where).absolute())


def _options(scheme: str) -> dict[str, Any]:
    # s3fs caches directory listings per instance; darkstore's readers and writers live in
    # different processes, so a listing must always be fresh
    return {"use_listings_cache": False} if scheme == "s3" else {}


class _access:
    """Turn a backend's failure to reach the location (no credentials, no bucket, refused) into a
    :class:`StoreAccessError` that says where credentials come from."""

    def __init__(self, loc: Location):
        self.loc = loc

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None or isinstance(exc, (FileNotFoundError, StoreURLError)) or self.loc.scheme != "s3":
            return False
        raise access_error(self.loc, exc) from exc


def access_error(loc: Location, exc: BaseException) -> StoreAccessError:
    return StoreAccessError(
        f"cannot reach {loc}: {type(exc).__name__}: {exc}. Credentials and the endpoint come from the AWS "
        "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_ENDPOINT_URL for an "
        "S3-compatible server), never from the job spec")


__all__ = ["Location", "SCHEMES", "access_error", "canonical"]
