"""Opening a transfer set from its spec (:mod:`darkstore.data` declares the specs and the sets of arrays,
images and datasets; :mod:`darkstore.text` the text corpora): the one place that maps a spec's kind to its set."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

from .data import (
    ArraysSet, ArraysSpec, DataSpec, FactorySpec, HuggingFaceSet, HuggingFaceSpec, ImageFolderSet, ImageFolderSpec, TextSpec,
    TorchvisionSpec, TransferSet, WrappedSet, parse_data_spec,
)
from .errors import DataError, DataNotFoundError, SpecError
from .fingerprint import FingerprintPolicy
from .paths import import_callable, resolve
from .text import TextSet


def open_transfer_set(
    spec: DataSpec | dict | str | Path,
    *,
    allow_code: bool = False,
    base_dir: str | Path | None = None,
    roots: Sequence[str | Path] | None = None,
    fingerprints: FingerprintPolicy | None = None,
    prompts: int | None = None,
) -> TransferSet:
    """Open a transfer set. Paths resolve against ``base_dir`` and must lie in ``roots`` when given;
    ``fingerprints``: how its fingerprint is computed (default: from scratch, every file hashed); ``prompts``:
    open a text set's prompts instead, each that many times (the rows of a job whose teachers write responses)."""
    ds = _open(parse_data_spec(spec), allow_code=allow_code, base_dir=base_dir, roots=roots)
    if prompts is not None:
        ds = ds.prompt_set(prompts)
    if len(ds) == 0:  # here, before anything (a fingerprint, a probe) reads a first sample
        raise DataError("the transfer set is empty")
    if fingerprints is not None:
        ds.fingerprints = fingerprints
    return ds


def _open(spec: DataSpec, *, allow_code: bool, base_dir: str | Path | None,
          roots: Sequence[str | Path] | None) -> TransferSet:
    return OPENERS[spec.kind](spec, allow_code=allow_code, base_dir=base_dir, roots=roots)


def _arrays(spec: ArraysSpec, *, base_dir, roots, **_) -> TransferSet:
    return ArraysSet(spec, resolve(spec.path, base_dir=base_dir, roots=roots))


def _image_folder(spec: ImageFolderSpec, *, base_dir, roots, **_) -> TransferSet:
    return ImageFolderSet(spec, resolve(spec.root, base_dir=base_dir, roots=roots))


def _huggingface(spec: HuggingFaceSpec, *, base_dir, roots, **_) -> TransferSet:
    return HuggingFaceSet(spec, resolve(spec.root, base_dir=base_dir, roots=roots))


def _text(spec: TextSpec, *, base_dir, roots, **_) -> TransferSet:
    template = None if spec.chat_template is None else resolve(spec.chat_template, base_dir=base_dir, roots=roots)
    return TextSet(spec, resolve(spec.root, base_dir=base_dir, roots=roots),
                   resolve(spec.tokenizer, base_dir=base_dir, roots=roots), template)


def _torchvision(spec: TorchvisionSpec, *, base_dir, roots, **_) -> TransferSet:
    import torchvision  # heavy: only for a torchvision transfer set

    root = resolve(spec.root, base_dir=base_dir, roots=roots)
    cls = getattr(torchvision.datasets, spec.name, None)
    if cls is None or not isinstance(cls, type):
        raise SpecError(f"torchvision has no dataset {spec.name!r}")
    if "download" in spec.kwargs:
        raise SpecError("darkstore never downloads datasets; remove 'download' and point root at local files")
    if not root.exists():
        raise DataNotFoundError(f"dataset root not found: {root}")
    try:
        ds = cls(root=str(root), download=False, **spec.kwargs) if _takes_download(cls) else cls(root=str(root), **spec.kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise DataNotFoundError(f"torchvision {spec.name} not found under {root}: {exc}") from exc
    except TypeError as exc:
        raise SpecError(f"bad kwargs for torchvision {spec.name}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 — an abstract class (VisionDataset), a dataset that refuses
        raise SpecError(f"torchvision {spec.name} cannot be opened: {type(exc).__name__}: {exc}") from exc
    return WrappedSet(spec, ds, root=root.resolve())


def _factory(spec: FactorySpec, *, allow_code, **_) -> TransferSet:
    fn = import_callable(spec.factory, allow_code=allow_code, what="dataset factory")
    return WrappedSet(spec, fn(**spec.kwargs))


#: how each kind of transfer-set spec (its ``kind:``) opens
OPENERS = {"arrays": _arrays, "image_folder": _image_folder, "huggingface": _huggingface, "text": _text,
           "torchvision": _torchvision, "factory": _factory}


def _takes_download(cls: type) -> bool:
    try:
        return "download" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
