"""Small helpers around zarr-python 3 shared by the writer and the reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from .errors import SchemaError, StoreNotFoundError
from .schema import ATTR_KEY, SCHEMA_VERSION, StoreMeta


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
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{path} has schema version {version}; this darkstore reads version {SCHEMA_VERSION}")
    try:
        meta = StoreMeta.model_validate(raw)
    except Exception as exc:
        raise SchemaError(f"{path} has invalid darkstore attributes: {exc}") from exc
    _check_arrays(group, meta, path)
    return group, meta


def _check_arrays(group: zarr.Group, meta: StoreMeta, path: Path) -> None:
    n, c, m, k = meta.num_rows, meta.num_classes, meta.num_members, meta.n_chunks
    expected = {
        "logits": ((n, c), np.dtype(meta.dtype)),
        "labels": ((n,), np.dtype("int64")),
        "index": ((n,), np.dtype("int64")),
        "stats": ((k, 2 + m), np.dtype("int64")),
        "done": ((k,), np.dtype("uint8")),
    }
    if meta.keep_members:
        expected["members"] = ((m, n, c), np.dtype(meta.dtype))
    for name, (shape, dtype) in expected.items():
        try:
            arr = group[name]
        except KeyError:
            raise SchemaError(f"{path} lacks the '{name}' array") from None
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
            raise SchemaError(
                f"{path}/{name} is {tuple(arr.shape)} {arr.dtype}, schema says {shape} {dtype}"
            )


def disk_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
