"""Transfer sets from real files: image folders, a torchvision dataset from a local root, arrays."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from darkstore.data import parse_data_spec

from darkstore.transfer import open_transfer_set
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


def _interp_f64(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Antialiased bilinear (triangle filter) resampling of [C, H, W] in float64, written from the definition:
    each output pixel is the triangle-weighted mean of the input pixels under its footprint (PIL's and
    torchvision's antialias rule, support scaled by the downsampling factor)."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support = max(scale, 1.0)
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            centre = (o + 0.5) * scale
            lo, hi = int(max(0, np.floor(centre - support))), int(min(n_in, np.ceil(centre + support)))
            for i in range(lo, hi):
                w[o, i] = max(0.0, 1.0 - abs((i + 0.5 - centre) / support))
            w[o] /= w[o].sum()
        return w

    wh, ww = weights(x.shape[1], oh), weights(x.shape[2], ow)
    return np.einsum("oh,chw,pw->cop", wh, x, ww)


def test_image_folder_evaluation_transform_short_side_then_centre_crop(tmp_path):
    """Images of different shapes become one batch: shorter side to 32 (aspect kept), centre crop 24, against a
    float64 reference written from the definition, and the exact crop of the decoded pixels."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    shapes = [(48, 64), (64, 40), (32, 32)]  # H x W
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    spec = {"kind": "image_folder", "root": str(tmp_path / "imgs"), "short_side": 32, "crop": 24}
    ds = open_transfer_set(spec)
    x, _ = ds.get_batch(np.arange(3))
    assert x.shape == (3, 3, 24, 24)
    for i, (h, w) in enumerate(shapes):
        raw = np.asarray(Image.open(root / f"{i}.png"), dtype=np.float64).transpose(2, 0, 1) / 255.0
        oh, ow = (32, int(32 * w / h)) if h <= w else (int(32 * h / w), 32)
        ref = _interp_f64(raw, oh, ow) if (oh, ow) != (h, w) else raw
        top, left = int(round((oh - 24) / 2.0)), int(round((ow - 24) / 2.0))
        np.testing.assert_allclose(x[i].double().numpy(), ref[:, top:top + 24, left:left + 24], atol=2e-5)
    # the geometry is part of the content fingerprint, only when set
    plain = open_transfer_set({"kind": "image_folder", "root": str(tmp_path / "imgs")})
    assert plain.fingerprint != ds.fingerprint
    assert open_transfer_set({**spec, "crop": 16}).fingerprint != ds.fingerprint
    with pytest.raises(SpecError, match="differ in size"):
        plain.get_batch(np.arange(3))
    with pytest.raises(SpecError, match="crop 40 is larger"):
        open_transfer_set({**spec, "crop": 40})[0]
    with pytest.raises(SpecError, match="not both"):
        parse_data_spec({**spec, "size": 16})
    # resample: uint8 resizes the 8-bit image in fixed point, as PIL (and a preset applied to PIL images) does:
    # whole levels, within one level of the float reference, and another fingerprint (other pixels)
    fast = open_transfer_set({**spec, "resample": "uint8"})
    xf, _ = fast.get_batch(np.arange(3))
    assert (torch.round(xf * 255) - xf * 255).abs().max() < 1e-4 and (xf - x).abs().max() <= 1 / 255 + 1e-6
    assert fast.fingerprint != ds.fingerprint


def test_member_preprocess_matches_torchvision_weights_own_transform():
    """A member's short_side + crop + mean/std on the device is the evaluation preset torchvision ships with
    its ImageNet weights (Resize(256) -> CenterCrop(224) -> Normalize)."""
    import torch
    from torchvision.models import ResNet18_Weights

    from darkstore.models import Preprocess, preprocess

    preset = ResNet18_Weights.IMAGENET1K_V1.transforms()
    ours = Preprocess(short_side=preset.resize_size[0], crop=preset.crop_size[0], mean=list(preset.mean),
                      std=list(preset.std), interpolation=preset.interpolation.value)
    x = torch.rand(2, 3, 300, 420)
    torch.testing.assert_close(preprocess(x, ours), preset(x), atol=1e-5, rtol=0)
    # options added later stay out of the dump when unset: older jobs keep their keys
    assert Preprocess(resize=16).model_dump() == {"channels": None, "resize": 16, "mean": None, "std": None}


@pytest.mark.parametrize("name", ["ResNet50_Weights.IMAGENET1K_V2", "EfficientNet_B3_Weights.IMAGENET1K_V1",
                                  "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"])
def test_a_torchvision_preset_by_name_is_the_weights_own_transform(name):
    """preset: torchvision/<Weights>.<NAME> reads torchvision's ImageClassification preset (232/224 bilinear,
    320/300 bicubic, 384/384 bicubic here) and applies it on the device as the preset does."""
    import torch
    from torchvision.models import get_weight

    from darkstore.models import Preprocess, preprocess

    ref = get_weight(name).transforms()
    p = Preprocess(preset=f"torchvision/{name}")
    assert (p.short_side, p.crop, p.interpolation) == (ref.resize_size[0], ref.crop_size[0], ref.interpolation.value)
    x = torch.rand(2, 3, 300, 420)
    torch.testing.assert_close(preprocess(x, p), ref(x), atol=1e-5, rtol=0)
    # recorded with the values it stood for; re-reading the record is the same spec; options beside it win
    assert Preprocess.model_validate(p.model_dump()) == p and p.model_dump()["preset"] == f"torchvision/{name}"
    assert Preprocess(preset=f"torchvision/{name}", crop=192).crop == 192


@pytest.mark.parametrize("name", ["resnet50.a1_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k"])
def test_a_timm_preset_by_name_is_timms_eval_transform(name):
    """preset: timm/<model> gives what timm's own create_transform(resolve_data_config(model)) computes
    (crop_pct 0.95 -> shorter side 235, bicubic; 0.9 -> 248 with mean/std 0.5)."""
    timm = pytest.importorskip("timm")
    import torch
    from timm.data import create_transform, resolve_data_config

    from darkstore.models import Preprocess, preprocess

    ref = create_transform(**resolve_data_config({}, model=timm.create_model(name, pretrained=False)),
                           is_training=False)
    x = torch.rand(3, 300, 420)
    torch.testing.assert_close(preprocess(x[None], Preprocess(preset=f"timm/{name}"))[0], ref(x), atol=1e-5, rtol=0)


def test_unknown_presets_are_refused_with_the_names_that_work():
    from darkstore.models import Preprocess

    for bad, words in [("torchvision/Nope_Weights.X", "no such weights"), ("resnet50", "torchvision/<Weights>"),
                       ("timm/not_a_model_at_all", "no pretrained config"),
                       ("torchvision/ResNet50_Weights.IMAGENET1K_V2", "not both")]:
        with pytest.raises(ValueError, match=words):
            Preprocess(preset=bad, **({"resize": 64} if "not both" in words else {}))


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_fast_decoding_gives_pils_pixels_for_every_kind_of_file(tmp_path):
    """read_image decodes JPEG/PNG/GIF/WebP through torchvision.io and everything else through PIL; the pixels
    equal PIL's convert(mode) for grey, palette, alpha, CMYK, progressive and 16-bit files, so a store does
    not depend on which decoder ran. A broken file is one clear error either way."""
    import torch

    from darkstore.data import _read_image_pil, read_image

    a = np.random.default_rng(0).integers(0, 256, (61, 47, 4), dtype=np.uint8)
    rgb, grey = Image.fromarray(a[..., :3].copy()), Image.fromarray(a[..., 0].copy(), "L")
    files = {
        "rgb.jpg": _encoded(rgb, "JPEG", quality=90), "sub.jpg": _encoded(rgb, "JPEG", quality=70, subsampling=2),
        "prog.jpg": _encoded(rgb, "JPEG", progressive=True), "grey.jpg": _encoded(grey, "JPEG"),
        "cmyk.jpg": _encoded(Image.fromarray(a, "CMYK"), "JPEG"), "rgb.png": _encoded(rgb, "PNG"),
        "rgba.png": _encoded(Image.fromarray(a, "RGBA"), "PNG"), "grey.png": _encoded(grey, "PNG"),
        "la.png": _encoded(Image.fromarray(a[..., :2].copy(), "LA"), "PNG"),
        "palette.png": _encoded(rgb.quantize(64), "PNG", transparency=3),
        "deep.png": _encoded(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "PNG"),
        "bits.png": _encoded(Image.fromarray(a[..., 0] > 128), "PNG"), "anim.gif": _encoded(rgb.quantize(64), "GIF"),
        "rgba.webp": _encoded(Image.fromarray(a, "RGBA"), "WEBP"), "rgb.bmp": _encoded(rgb, "BMP"),
        "rgb.tiff": _encoded(rgb, "TIFF"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        for mode in ("RGB", "L"):
            with Image.open(tmp_path / name) as im:
                ref = torch.from_numpy(np.array(im.convert(mode))).reshape(61, 47, -1).permute(2, 0, 1)
            got = read_image(str(tmp_path / name), mode)
            assert got.dtype == torch.uint8 and torch.equal(got, ref), (name, mode)
            assert torch.equal(_read_image_pil(str(tmp_path / name), mode), ref)
    (tmp_path / "cut.jpg").write_bytes(files["rgb.jpg"][:len(files["rgb.jpg"]) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    for bad in ("cut.jpg", "empty.png", "missing.jpg"):
        with pytest.raises(DataNotFoundError, match=f"cannot read image .*{bad}"):
            read_image(str(tmp_path / bad))


def test_a_hugging_face_dataset_on_disk_is_a_transfer_set(tmp_path):
    """kind: huggingface reads a dataset saved with save_to_disk (Image and ClassLabel features, or arrays):
    the pixels PIL decodes, the labels and class names, the dataset's own fingerprint; a store made from it
    through the CLI. A DatasetDict needs split:, a missing column names the columns there are."""
    datasets = pytest.importorskip("datasets")
    import subprocess

    from .conftest import DARKSTORE, MEMBERS, cli_env, make_ensemble

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 40)
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=list("abcde"))})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "y": labels.tolist()},
                                    features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(tmp_path / "hf"))
    spec = {"kind": "huggingface", "root": str(tmp_path / "hf"), "split": "train", "image": "img", "label": "y",
            "mode": "L"}
    got = open_transfer_set(spec)
    assert len(got) == 40 and got.class_names == list("abcde") and np.array_equal(got.labels(), labels)
    x, y = got.get_batch(np.arange(40))
    grey = np.stack([np.asarray(Image.fromarray(p).convert("L")) for p in pixels])[:, None] / 255.0
    np.testing.assert_allclose(x.numpy(), grey, atol=1e-7)
    assert np.array_equal(y.numpy(), labels)
    # its fingerprint is the dataset's own: the same when opened again, another for another split or content
    assert open_transfer_set(spec).fingerprint == got.fingerprint
    assert open_transfer_set({**spec, "split": "test"}).fingerprint != got.fingerprint
    ds.map(lambda r: {"y": (r["y"] + 1) % 5}).save_to_disk(str(tmp_path / "hf2"))
    assert open_transfer_set({**spec, "root": str(tmp_path / "hf2"), "split": None}).fingerprint != got.fingerprint
    # arrays instead of images; unlabeled
    datasets.Dataset.from_dict({"x": pixels.transpose(0, 3, 1, 2)}, features=datasets.Features(
        {"x": datasets.Array3D((3, 8, 8), "uint8")})).save_to_disk(str(tmp_path / "arr"))
    arr = open_transfer_set({"kind": "huggingface", "root": str(tmp_path / "arr"), "image": "x", "label": None})
    xa, ya = arr.get_batch(np.arange(3))
    np.testing.assert_allclose(xa.numpy(), pixels[:3].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    assert (ya == -1).all()
    with pytest.raises(SpecError, match="splits train, test"):
        open_transfer_set({**spec, "split": None})
    with pytest.raises(SpecError, match="no column 'image'.*img, y"):
        open_transfer_set({**spec, "image": "image"})
    # a store from it, as users run it: a data spec file relative to itself
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**spec, "root": "hf"}))
    ens = make_ensemble(tmp_path / "t", [MEMBERS[0]])
    r = subprocess.run([*DARKSTORE, "generate", "--teachers", str(ens), "--data", str(tmp_path / "data.yaml"),
                        "--out", str(tmp_path / "store")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    store = open_store(tmp_path / "store")
    rows = store.read_all()
    assert store.meta.num_rows == 40 and store.meta.class_names == list("abcde")
    assert np.array_equal(rows.labels, labels[rows.index])


def test_a_factory_yielding_dicts_gets_a_clear_error():
    """A Hugging Face dataset returned by a factory yields dicts: one clear message that names the keys and
    the kind that reads such datasets (not a TypeError from deep in the loader)."""
    ds = open_transfer_set({"kind": "factory", "factory": "tests.factories:dict_items"}, allow_code=True)
    with pytest.raises(SpecError, match="yields dicts \\(keys image, label\\).*kind: huggingface"):
        ds.get_batch(np.arange(2))


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


def test_decoding_sets_get_loader_workers_by_default_and_the_same_store(tmp_path, monkeypatch):
    """Image folders decode per sample, so generation starts DataLoader workers unless told otherwise; arrays
    files (one slice a batch) and daemonic processes (a Celery prefork child) get none. The store is the same
    bytes either way."""
    import multiprocessing

    import torch

    from teacher_service.kinds.classes import loader_workers

    root = write_images(tmp_path / "imgs", n_per_class=10)
    folder = open_transfer_set({"kind": "image_folder", "root": str(root), "size": 16})
    arrays = open_transfer_set({"kind": "arrays", "path": str(_arrays(tmp_path / "x.npz"))})
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert (loader_workers(folder, cpu), loader_workers(folder, gpu), loader_workers(arrays, gpu)) == (8, 8, 0)
    assert (loader_workers(arrays, cpu, 3), loader_workers(folder, cpu, 0)) == (3, 0)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert (loader_workers(folder, cpu), loader_workers(folder, gpu)) == (1, 1)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert loader_workers(folder, gpu) == 0 and loader_workers(folder, gpu, 4) == 0  # asked for: still none
    monkeypatch.undo()
    ens = make_ensemble(tmp_path / "t", [{"arch": "small_cnn", "arch_kwargs": {"in_channels": 3, "width": 4}}],
                        num_classes=3)
    spec = job(ens, root).model_copy(update={"data": parse_data_spec({"kind": "image_folder", "root": str(root),
                                                                      "size": 16}), "chunk_rows": 8})
    workers = generate(spec, tmp_path / "auto").path  # default: workers (one on a 2-core machine)
    inline = generate(spec, tmp_path / "inline", num_workers=0).path
    a, b = open_store(workers).read_all(), open_store(inline).read_all()
    assert np.array_equal(a.logits, b.logits) and np.array_equal(a.labels, b.labels)


def _arrays(path):
    np.savez(path, x=np.zeros((4, 3), np.float32), y=np.arange(4))
    return path
