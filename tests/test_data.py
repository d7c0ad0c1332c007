"""Transfer sets from real files: image folders, a torchvision dataset from a local root, arrays."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import yaml
from PIL import Image

from darkstore.data import open_transfer_set, parse_data_spec
from darkstore.paths import resolve
from storage import open_store
from darkstore.errors import DataNotFoundError, PathOutsideRootsError, SpecError
from teacher_service.generate import generate

from .conftest import job, make_ensemble


def write_images(root, labeled=True, n_per_class=6, classes=("cat", "dog", "eel"), size=8, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes if labeled else ["."]:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(d / f"{i:03d}.png")
    return root


def test_image_folder_labeled_and_flat(tmp_path):
    lab = open_transfer_set({"kind": "image_folder", "root": str(write_images(tmp_path / "lab")), "mode": "L"})
    assert lab.class_names == ["cat", "dog", "eel"] and len(lab) == 18
    x, y = lab[7]
    assert x.shape == (1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1 and y == 1
    flat = open_transfer_set({"kind": "image_folder", "root": str(write_images(tmp_path / "flat", labeled=False)),
                              "mode": "L"})
    assert flat.class_names is None and (flat.labels() == -1).all()


def test_image_folder_generation_and_fingerprint(tmp_path):
    root = write_images(tmp_path / "imgs")
    ens = make_ensemble(tmp_path / "t", [{"arch": "small_cnn", "arch_kwargs": {"in_channels": 3, "width": 4}}],
                        num_classes=3)
    # RGB conversion: a 3-channel model over grayscale PNGs, resized to 16x16 by the data spec
    spec = {"kind": "image_folder", "root": str(root), "size": 16}
    w = generate(job(ens, root).model_copy(update={"data": parse_data_spec(spec)}), tmp_path / "s")
    r = open_store(w.path)
    assert r.meta.class_names == ["cat", "dog", "eel"]
    assert r.read_all().labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    fp = r.meta.transfer_set.fingerprint
    # the fingerprint follows content, not location
    shutil.copytree(root, tmp_path / "moved")
    assert open_transfer_set({**spec, "root": str(tmp_path / "moved")}).fingerprint == fp
    img = tmp_path / "moved" / "dog" / "002.png"
    a = np.array(Image.open(img))
    a[0, 0] ^= 1
    Image.fromarray(a).save(img)
    assert open_transfer_set({**spec, "root": str(tmp_path / "moved")}).fingerprint != fp


def _write_idx(path, arr: np.ndarray):
    magic = {1: 0x0801, 3: 0x0803}[arr.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


def test_torchvision_dataset_from_local_root_never_downloads(tmp_path):
    """MNIST's own loader reading IDX files we write (no network)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    ds = open_transfer_set({"kind": "torchvision", "name": "MNIST", "root": str(tmp_path), "kwargs": {"train": False}})
    assert len(ds) == 20 and ds[0][0].shape == (1, 28, 28) and len(ds.class_names) == 10
    ens = make_ensemble(tmp_path / "t", [{"arch": "mlp", "arch_kwargs": {"in_features": 784, "hidden": [8]}}],
                        num_classes=10)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"kind": "torchvision", "name": "MNIST", "root": ".",
                                                        "kwargs": {"train": False}}))
    w = generate(job(ens, tmp_path / "spec.yaml"), tmp_path / "s")
    assert open_store(w.path).meta.num_rows == 20
    with pytest.raises(DataNotFoundError):
        open_transfer_set({"kind": "torchvision", "name": "CIFAR10", "root": str(tmp_path)})
    with pytest.raises(SpecError, match="never downloads"):
        open_transfer_set({"kind": "torchvision", "name": "MNIST", "root": str(tmp_path), "kwargs": {"download": True}})


def test_npy_and_npz_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((10, 4), np.float32))
    ds = open_transfer_set(tmp_path / "x.npy")
    assert len(ds) == 10 and (ds.labels() == -1).all()
    np.savez(tmp_path / "nox.npz", a=np.zeros(3))
    with pytest.raises(SpecError, match="no array 'x'"):
        open_transfer_set(tmp_path / "nox.npz")
    np.savez(tmp_path / "bady.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(SpecError, match="y must be integer"):
        open_transfer_set(tmp_path / "bady.npz")
    with pytest.raises(DataNotFoundError):
        open_transfer_set(tmp_path / "empty_dir_that_is_missing")


def test_paths_outside_roots_are_refused(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.npz").write_bytes(b"")
    (root / "link.npz").symlink_to(tmp_path / "secret.npz")
    assert resolve("sub", base_dir=root, roots=[root]) == (root / "sub").resolve()
    for bad in ("../secret.npz", "link.npz", str(tmp_path / "secret.npz")):
        with pytest.raises(PathOutsideRootsError, match="outside the data roots"):
            resolve(bad, base_dir=root, roots=[root])
    with pytest.raises(PathOutsideRootsError):
        open_transfer_set({"kind": "arrays", "path": str(root / "link.npz")}, roots=[root])
