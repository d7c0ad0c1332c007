"""Opening and creating a store's Zarr group at any :class:`~storage.location.Location`."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from .errors import SchemaError, StoreAccessError, StoreNotFoundError
from .fields import check_arrays, create_arrays
from .location import Location, access_error
from .schema import ATTR_KEY, READABLE_VERSIONS, SCHEMA_VERSION, StoreMeta

# numcodecs' zarr 3 codecs (Delta, Shuffle: storage.fields.codecs_for) warn on every open that other zarr
# implementations may lack them; darkstore reads its stores with zarr-python
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

#: an object written before a remote store's arrays and removed after its attributes: a location
#: holding it is a creation that crashed, safe to start again
CREATING = ".darkstore-creating"


def compressors(name: str):
    """Zarr's own codecs for a compressor name (``none`` stores raw bytes)."""
    if name == "zstd":
        return (ZstdCodec(level=3),)
    if name == "blosc":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    if name == "none":
        return None
    raise SchemaError(f"unknown compressor {name!r}; choose zstd, blosc or none")


def store_attrs(loc: Location) -> dict | None:
    """The darkstore attributes of the group at ``loc``, or None when there is no store there."""
    raw = loc.read_bytes("zarr.json")
    if raw is None:
        return None
    try:
        return json.loads(raw).get("attributes", {}).get(ATTR_KEY)
    except (ValueError, AttributeError):
        return None


def is_store(where: str | Path | Location) -> bool:
    return store_attrs(Location.parse(where)) is not None


def open_group(where: str | Path | Location, mode: str = "r") -> tuple[zarr.Group, StoreMeta]:
    """Open a store's group and validate its attributes."""
    loc = Location.parse(where)
    raw_json = loc.read_bytes("zarr.json")
    if raw_json is None:
        raise StoreNotFoundError(f"no darkstore store at {loc} (no zarr.json)")
    try:
        group = zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
    except StoreAccessError:
        raise
    except Exception as exc:  # zarr raises several types for a broken group
        if loc.scheme == "s3" and not isinstance(exc, (ValueError, KeyError)):
            raise access_error(loc, exc) from exc
        raise SchemaError(f"{loc} is not a readable Zarr v3 group: {exc}") from exc
    raw = group.attrs.get(ATTR_KEY)
    if raw is None:
        why = ("its creation did not finish; generate again to recreate it" if loc.exists(CREATING)
               else f"no '{ATTR_KEY}' attributes")
        raise StoreNotFoundError(f"{loc} is a Zarr group but not a darkstore store ({why})")
    version = raw.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise SchemaError(f"{loc} has schema version {version}; this darkstore reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} and writes {SCHEMA_VERSION}")
    try:
        meta = StoreMeta.model_validate(raw)
    except Exception as exc:
        raise SchemaError(f"{loc} has invalid darkstore attributes: {exc}") from exc
    check_arrays(group, meta, loc, SchemaError)
    return group, meta


def create(loc: Location, meta: StoreMeta) -> None:
    """Create the group and every declared field at full size, crash-safe on every scheme.

    A store exists once its group's ``zarr.json`` carries the darkstore attributes, and those are
    written last. Locally the whole group is built under a temporary name and renamed into place
    (atomic, and two racing creators end with one store). Object stores have no rename: a
    :data:`CREATING` marker goes first, then the arrays, then the attributes, then the marker is
    removed, so a crash leaves a marked, attribute-less group that the next creation replaces."""
    attrs = {ATTR_KEY: meta.model_dump(mode="json")}
    if loc.local is not None:
        path = loc.local
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.creating")
        group = zarr.create_group(str(tmp), zarr_format=3, attributes=attrs)
        create_arrays(group, meta, compressors(meta.compressor))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_store(path):
                raise
        return
    loc.write_bytes(CREATING, json.dumps({"job_key": meta.job_key}).encode())
    try:
        group = zarr.create_group(loc.zarr_store(read_only=False), zarr_format=3)
        create_arrays(group, meta, compressors(meta.compressor))
        group.update_attributes(attrs)
    except StoreAccessError:
        raise
    except Exception as exc:  # noqa: BLE001 — the backend's own error types
        raise access_error(loc, exc) from exc
    loc.remove(CREATING)


def unfinished_creation(loc: Location) -> bool:
    """Whether ``loc`` holds what a crashed :func:`create` left (no attributes, the marker present)."""
    return loc.exists(CREATING) and store_attrs(loc) is None


def disk_bytes(where: str | Path | Location) -> int:
    return Location.parse(where).size_bytes()


def copy_store(src: Path, dst: Location) -> None:
    """Copy the local store at ``src`` to ``dst``, file by file; its commit marks (``done/``) go last, so a copy
    cut short is a store whose uncommitted chunks a resume recomputes, never one that claims a chunk it lacks."""
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    keys = [p.relative_to(src).as_posix() for p in files]
    for f, key in sorted(zip(files, keys), key=lambda fk: fk[1].startswith("done/")):
        dst.write_bytes(key, f.read_bytes())
