"""Small helpers around zarr-python 3 shared by the writer and the reader."""

from __future__ import annotations

import json
from pathlib import Path

import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from .errors import SchemaError, StoreNotFoundError
from .fields import check_arrays
from .schema import ATTR_KEY, READABLE_VERSIONS, SCHEMA_VERSION, StoreMeta


def compressors(name: str):
    """Zarr's own codecs for a compressor name (``none`` stores raw bytes)."""
    if name == "zstd":
        return (ZstdCodec(level=3),)
    if name == "blosc":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    if name == "none":
        return None
    raise SchemaError(f"unknown compressor {name!r}; choose zstd, blosc or none")


def is_store(path: str | Path) -> bool:
    p = Path(path) / "zarr.json"
    if not p.is_file():
        return False
    try:
        return ATTR_KEY in json.loads(p.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def open_group(path: str | Path, mode: str = "r") -> tuple[zarr.Group, StoreMeta]:
    """Open a store's group and validate its attributes."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreNotFoundError(f"no darkstore store at {path} (no zarr.json)")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as exc:  # zarr raises several types for a broken group
        raise SchemaError(f"{path} is not a readable Zarr v3 group: {exc}") from exc
    raw = group.attrs.get(ATTR_KEY)
    if raw is None:
        raise StoreNotFoundError(f"{path} is a Zarr group but not a darkstore store (no '{ATTR_KEY}' attributes)")
    version = raw.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise SchemaError(f"{path} has schema version {version}; this darkstore reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} and writes {SCHEMA_VERSION}")
    try:
        meta = StoreMeta.model_validate(raw)
    except Exception as exc:
        raise SchemaError(f"{path} has invalid darkstore attributes: {exc}") from exc
    _check_arrays(group, meta, path)
    return group, meta


def _check_arrays(group: zarr.Group, meta: StoreMeta, path: Path) -> None:
    check_arrays(group, meta, path, SchemaError)


def disk_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
