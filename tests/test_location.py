"""Store locations: which spellings are accepted, how they print, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import Location
from storage.errors import StoreURLError


@pytest.mark.parametrize("where, scheme, path, shown", [
    ("runs/store", "file", "runs/store", "runs/store"),
    ("/data/store", "file", "/data/store", "/data/store"),
    (Path("/data/store"), "file", "/data/store", "/data/store"),
    ("file:///data/store", "file", "/data/store", "/data/store"),
    ("file://localhost/data/store", "file", "/data/store", "/data/store"),
    ("s3://bucket/a/store", "s3", "bucket/a/store", "s3://bucket/a/store"),
    ("s3://bucket/a/store/", "s3", "bucket/a/store", "s3://bucket/a/store"),
    ("S3://bucket/x", "s3", "bucket/x", "s3://bucket/x"),
    ("memory://tests/store", "memory", "tests/store", "memory://tests/store"),
    ("weird:name", "file", "weird:name", "weird:name"),  # a local name with a colon is still a local name
])
def test_accepted_spellings(where, scheme, path, shown):
    loc = Location.parse(where)
    assert (loc.scheme, loc.path, str(loc)) == (scheme, path, shown)
    assert Location.parse(str(loc)) == loc  # the printed form parses back to the same place


@pytest.mark.parametrize("where, message", [
    ("gs://bucket/store", "unknown scheme 'gs'"),
    ("http://example.com/store", "unknown scheme 'http'"),
    ("s3:bucket/store", "without '//'"),
    ("s3://", "names no bucket"),
    ("s3://key:secret@bucket/store", "credentials in a URL"),
    ("s3://bucket/store?region=x", "no \\?query"),
    ("s3://bucket/../other", "'..'"),
    ("file://host/data", "no host"),
    ("", "empty"),
])
def test_refused_spellings(where, message):
    with pytest.raises(StoreURLError, match=message):
        Location.parse(where)


def test_children_stay_on_the_scheme():
    assert str(Location.parse("s3://b/jobs").child("abc")) == "s3://b/jobs/abc"
    assert str(Location.parse("/d/jobs").child("abc")) == "/d/jobs/abc"
    assert Location.parse("memory://m/a").name == "a"
