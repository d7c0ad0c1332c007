"""Transfer sets: where the inputs (and hard labels) come from.

Five kinds, chosen by ``kind`` in a data spec:

- ``arrays``: a ``.npz`` with ``x`` and optional ``y`` (or a ``.npy`` of ``x``);
- ``image_folder``: an ``ImageFolder`` tree (labeled) or a flat folder of images (unlabeled);
- ``torchvision``: a torchvision dataset by name from a local root — never downloads;
- ``huggingface``: a Hugging Face dataset saved to disk (``save_to_disk``), image and label columns named;
- ``factory``: ``module:function`` returning a dataset — only with ``allow_code``;
- ``text``: a text corpus and a local tokenizer, cut into fixed-length token sequences (:mod:`darkstore.text`).

Every set yields ``(x, y)`` with ``x`` a float32 tensor (images ``[C, H, W]`` in
[0, 1]) and ``y`` an int (−1 when unlabeled), and has a content *fingerprint*: a
sha256 over the samples themselves, not their path, that the store records and the
trainer checks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from darkstore.errors import DataError, DataNotFoundError, SpecError

from .fingerprint import FingerprintPolicy, FingerprintReport, cached_whole, files_under, folder_digests

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArraysSpec(_Spec):
    kind: Literal["arrays"] = "arrays"
    path: str
    x_key: str = "x"
    y_key: str | None = "y"


class ImageFolderSpec(_Spec):
    kind: Literal["image_folder"] = "image_folder"
    root: str
    labeled: bool | None = Field(None, description="None: labeled when root holds class folders")
    mode: Literal["RGB", "L"] = "RGB"
    size: int | tuple[int, int] | None = Field(None, description="resize every image to this size on load "
                                               "(squashes: the aspect ratio is not kept)")
    short_side: int | None = Field(None, ge=1, description="on load, resize so the shorter side is this many "
                                   "pixels, aspect kept (the evaluation transform: with crop)")
    crop: int | tuple[int, int] | None = Field(None, description="on load, then centre-crop to this size")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    resample: Literal["float", "uint8"] = Field(
        "float", description="uint8: resize the decoded 8-bit image in fixed point, as PIL and torchvision's presets on "
        "PIL images do (within one level of float; about 2.5x faster per image at ImageNet sizes); float: resize "
        "in float32")

    @model_validator(mode="after")
    def _one_resize(self) -> "ImageFolderSpec":
        if self.size is not None and self.short_side is not None:
            raise ValueError("give size (an exact size) or short_side (the shorter side, aspect kept), not both")
        return self


class TorchvisionSpec(_Spec):
    kind: Literal["torchvision"] = "torchvision"
    name: str
    root: str
    kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {train: false} or {split: val}")


class HuggingFaceSpec(_Spec):
    kind: Literal["huggingface"] = "huggingface"
    root: str = Field(description="a dataset saved with datasets' save_to_disk (a Dataset, or a DatasetDict with "
                      "split:)")
    split: str | None = Field(None, description="the split of a saved DatasetDict")
    image: str = Field("image", description="the input column: an Image feature, or an array (uint8 scaled to "
                       "[0, 1], floats as stored)")
    label: str | None = Field("label", description="the hard-label column (None: unlabeled)")
    mode: Literal["RGB", "L"] = "RGB"
    size: int | tuple[int, int] | None = Field(None, description="resize every image to this size (squashes)")
    short_side: int | None = Field(None, ge=1, description="resize so the shorter side is this many pixels")
    crop: int | tuple[int, int] | None = Field(None, description="then centre-crop to this size")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"

    @model_validator(mode="after")
    def _one_resize(self) -> "HuggingFaceSpec":
        if self.size is not None and self.short_side is not None:
            raise ValueError("give size (an exact size) or short_side (the shorter side, aspect kept), not both")
        return self


class FactorySpec(_Spec):
    kind: Literal["factory"] = "factory"
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ChatSpec(_Spec):
    """How a chat transfer set's records are read and which tokens carry a loss (read by :mod:`darkstore.chat`)."""

    format: Literal["auto", "messages", "sharegpt", "prompt_completion"] = Field(
        "auto", description="messages: a list of {role, content} (roles system, user, assistant, tool); sharegpt: "
        "a list of {from, value} (system, human, gpt, tool); prompt_completion: a prompt and a completion, each "
        "text or a list of messages; auto: whichever column a record holds")
    column: str | None = Field(None, description="the column holding the conversation (default: messages, "
                               "conversations, or prompt and completion)")
    turns: Literal["all", "last"] = Field("all", description="which assistant turns carry a loss: every one, or "
                                          "the last of each conversation")
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="a conversation longer than a row: cut to the row (a conversation with no "
        "assistant token left inside it is dropped), or dropped; both are counted and reported")


class TextSpec(_Spec):
    """A text corpus cut into token sequences for language-model teachers (read by :mod:`darkstore.text`)."""

    kind: Literal["text"] = "text"
    root: str = Field(description="a text file or a folder of them (format files), a JSON-lines file (jsonl) or a "
                      "Hugging Face dataset saved to disk (huggingface)")
    format: Literal["files", "jsonl", "huggingface"] = Field(
        "files", description="files: each file is one document; jsonl: one document or record per line; "
        "huggingface: one per row of a dataset saved with save_to_disk")
    glob: str = Field("**/*.txt", description="files: the files under root that are read, in sorted order")
    field: str = Field("text", description="jsonl, huggingface: the text column (records: the response)")
    prompt: str | None = Field(None, description="records: the prompt column; its tokens carry no loss")
    split: str | None = Field(None, description="huggingface: the split of a saved DatasetDict")
    tokenizer: str = Field(description="a local tokenizer: a directory holding tokenizer.json (or a transformers "
                           "tokenizer), or a tokenizer.json file; never downloaded")
    length: int = Field(ge=1, le=1 << 20, description="positions per row: each row holds length + 1 tokens")
    packing: Literal["packed", "records", "chat"] = Field(
        "packed", description="packed: documents joined, each ended by the tokenizer's EOS, and cut into rows; "
        "records: one record per row (prompt, response, EOS), truncated to the row and padded, loss on the "
        "response only; chat: one conversation per row, rendered with the chat template, loss on the "
        "assistant's turns")
    chat: ChatSpec | None = Field(None, description="chat: the records' format and which turns carry a loss "
                                  "(default: every assistant turn)")
    chat_template: str | None = Field(None, description="chat: a Jinja template file used in place of the "
                                      "tokenizer's own (chat_template in tokenizer_config.json, or "
                                      "chat_template.jinja beside it)")

    @model_validator(mode="after")
    def _records(self) -> "TextSpec":
        if self.prompt is not None and self.packing != "records":
            raise ValueError("prompt: names the prompt column of records; give packing: records")
        if self.prompt is not None and self.format == "files":
            raise ValueError("prompt: needs a column: give format jsonl or huggingface")
        if (self.chat is not None or self.chat_template is not None) and self.packing != "chat":
            raise ValueError("chat: and chat_template: describe conversations; give packing: chat")
        if self.packing == "chat":
            if self.format == "files":
                raise ValueError("packing chat reads records: give format jsonl or huggingface")
            if self.chat is None:
                self.chat = ChatSpec()
        return self


DataSpec = Annotated[Union[ArraysSpec, ImageFolderSpec, TorchvisionSpec, HuggingFaceSpec, FactorySpec, TextSpec],
                     Field(discriminator="kind")]
DATA_SPEC = TypeAdapter(DataSpec)


def parse_data_spec(value: Any) -> DataSpec:
    """A spec from a dict, a YAML/JSON file, a ``.npz``/``.npy`` file or an image directory."""
    if isinstance(value, BaseModel):
        return value
    if isinstance(value, (str, Path)):
        p = Path(value)
        if p.suffix in (".yaml", ".yml", ".json"):
            from .specfile import load_spec_file

            raw = load_spec_file(p)
            return _rebase(DATA_SPEC.validate_python(raw), p.resolve().parent)
        if p.suffix in (".npz", ".npy"):
            return ArraysSpec(path=str(p))
        if p.is_dir():
            return ImageFolderSpec(root=str(p))
        if not p.exists():
            raise DataNotFoundError(f"transfer set {str(value)!r} does not exist")
        raise DataNotFoundError(
            f"cannot read data spec {str(value)!r}: give a .yaml/.json spec, a .npz/.npy file or an image folder"
        )
    try:
        return DATA_SPEC.validate_python(value)
    except Exception as exc:
        raise SpecError(f"invalid data spec: {exc}") from exc


#: the fields of each kind of data spec that name a file or folder (factories name none)
PATH_FIELDS = {"arrays": ("path",), "image_folder": ("root",), "torchvision": ("root",), "huggingface": ("root",),
               "text": ("root", "tokenizer", "chat_template")}


def _rebase(spec: DataSpec, base: Path) -> DataSpec:
    """Make a spec file's relative paths relative to the file."""
    for field in PATH_FIELDS.get(spec.kind, ()):
        if getattr(spec, field) is not None and not Path(getattr(spec, field)).is_absolute():
            spec = spec.model_copy(update={field: str(base / getattr(spec, field))})
    return spec


# --- the sets --------------------------------------------------------------------
class TransferSet(torch.utils.data.Dataset):
    """Base: subclasses fill ``__len__``, ``__getitem__``, ``_hash_content``."""

    spec: DataSpec
    class_names: list[str] | None = None
    decodes: bool = True  # reading a batch is per-sample work (files, decoding); False: one array slice
    fingerprints: FingerprintPolicy = FingerprintPolicy()  # open_transfer_set sets it

    def prompt_set(self, n: int) -> "TransferSet":
        """The set's prompts, each ``n`` times: the rows of a job whose teachers write responses (only a text
        set holds prompts)."""
        raise SpecError(f"a transfer set of kind {self.spec.kind} holds no prompts to write responses to")

    @cached_property
    def fingerprint_report(self) -> FingerprintReport:
        """What the fingerprint cost (filled when :attr:`fingerprint` is computed)."""
        return FingerprintReport()

    def labels(self) -> np.ndarray:
        """All hard labels (−1 where unlabeled)."""
        return np.array([int(self[i][1]) for i in range(len(self))], dtype=np.int64)

    def sample_of(self, rows: np.ndarray) -> np.ndarray:
        """The sample each row reads (the identity here; see :class:`Reordered`)."""
        return np.asarray(rows, dtype=np.int64)

    def get_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of ``rows``; subclasses with array storage do this without a loop."""
        xs, ys = zip(*(self[int(i)] for i in rows))
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the content (through the manifest of :attr:`fingerprints` where the set allows)."""
        return self._fingerprint()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"darkstore-transfer-set-v1:{len(self)}".encode())
        self._hash_content(h)
        return h.hexdigest()

    def _hash_content(self, h) -> None:  # default: every decoded sample
        for i in range(len(self)):
            x, y = self[i]
            _hash_tensor(h, x)
            h.update(int(y).to_bytes(8, "little", signed=True))


def _hash_tensor(h, x: torch.Tensor | np.ndarray) -> None:
    a = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


class ArraysSet(TransferSet):
    decodes = False

    def __init__(self, spec: ArraysSpec, path: Path):
        self.spec, self.path = spec, path.resolve()
        try:
            if path.suffix == ".npy":
                self._x, self._y = np.load(path, mmap_mode="r"), None
            else:
                with np.load(path, allow_pickle=False) as z:
                    if spec.x_key not in z:
                        raise SpecError(f"{path} has no array {spec.x_key!r} (has: {', '.join(z.files)})")
                    self._x = z[spec.x_key]
                    self._y = z[spec.y_key] if spec.y_key and spec.y_key in z else None
                    if "class_names" in z:
                        self.class_names = [str(s) for s in z["class_names"]]
        except SpecError:
            raise
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"transfer set file not found: {path}") from exc
        except Exception as exc:  # noqa: BLE001 — truncated zip, empty file, bad header: numpy raises many types
            raise DataError(f"cannot read transfer set {path}: {type(exc).__name__}: {exc}") from exc
        if self._x.ndim < 2:
            raise SpecError(f"{path}: x must be [N, ...] with one sample per row, got shape {self._x.shape}")
        if self._y is not None:
            if self._y.shape != (len(self._x),) or not np.issubdtype(self._y.dtype, np.integer):
                raise SpecError(f"{path}: y must be integer [N] matching x, got {self._y.dtype} {self._y.shape}")

    def __len__(self) -> int:
        return len(self._x)

    def __getitem__(self, i: int):
        y = int(self._y[i]) if self._y is not None else -1
        return torch.from_numpy(np.asarray(self._x[i], dtype=np.float32)), y

    def get_batch(self, rows):
        x = torch.from_numpy(np.asarray(self._x[rows], dtype=np.float32))
        y = torch.from_numpy(self._y[rows].astype(np.int64)) if self._y is not None else torch.full((len(rows),), -1)
        return x, y

    def labels(self) -> np.ndarray:
        return self._y.astype(np.int64) if self._y is not None else np.full(len(self), -1, dtype=np.int64)

    @cached_property
    def fingerprint(self) -> str:  # kept in the manifest while the file's size and mtime stay
        key = f"arrays:{self.path}:{self.spec.model_dump_json()}"
        return cached_whole("arrays", key, [str(self.path)], self._fingerprint, self.fingerprints,
                            self.fingerprint_report)

    def _hash_content(self, h) -> None:
        step = max(1, (64 << 20) // max(1, self._x[0].nbytes))
        h.update(f"{np.dtype(self._x.dtype).str}{self._x.shape}".encode())
        for s in range(0, len(self._x), step):
            h.update(np.ascontiguousarray(self._x[s:s + step]).tobytes())
        if self._y is not None:
            h.update(self.labels().tobytes())


class ImageFolderSet(TransferSet):
    def __init__(self, spec: ImageFolderSpec, root: Path):
        self.spec = spec
        if not root.is_dir():
            raise DataNotFoundError(f"image folder not found: {root}")
        subdirs = sorted(d for d in root.iterdir() if d.is_dir())
        labeled = spec.labeled if spec.labeled is not None else bool(subdirs)
        found = [_list_images(root, d.name) for d in subdirs] if labeled else [_list_images(root, "")]
        if labeled:
            self.class_names = [d.name for d in subdirs]
        self.relpaths = [rel for files in found for rel, _, _ in files]
        stats = np.array([st for files in found for _, *st in files], dtype=np.int64).reshape(-1, 2)
        self._stats = (stats[:, 0].copy(), stats[:, 1].copy())  # (sizes, mtimes_ns)
        top = str(root)  # strings, not Paths: a million Path objects cost seconds
        self.samples = [(f"{top}/{rel}", c if labeled else -1) for c, files in enumerate(found) for rel, _, _ in files]
        if not self.samples:
            raise DataNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as TF

        path, y = self.samples[i]
        x = read_image(path, self.spec.mode)
        if self.spec.resample == "float":
            x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.to_dtype(_load_geometry(x, self.spec), torch.float32, scale=True), y

    def get_batch(self, rows):
        xs, ys = zip(*(self[int(i)] for i in rows))
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            raise SpecError(f"images under {self.root} differ in size {sorted(shapes)[:3]}; set short_side: and crop: "
                            "(the evaluation transform) or size: in the data spec")
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

    def labels(self) -> np.ndarray:
        return np.array([y for _, y in self.samples], dtype=np.int64)

    def _hash_content(self, h) -> None:
        # Files, not decoded pixels: the same bytes decode to the same pixels.
        shape = [self.spec.mode, self.spec.size, self.class_names]
        geometry = self.spec.model_dump(include={"short_side", "crop", "interpolation"})
        if self.spec.short_side is not None or self.spec.crop is not None:  # only when set: older keys stay
            shape.append(geometry)
        if self.spec.resample != "float":
            shape.append({"resample": self.spec.resample})
        h.update(json.dumps(shape).encode())
        digests = folder_digests(self.root, self.relpaths, self.fingerprints, self.fingerprint_report,
                                 stats=self._stats)
        for rel, (_, y), d in zip(self.relpaths, self.samples, digests):
            h.update(f"{rel}\0{y}\0".encode())
            h.update(d)


def _load_geometry(x: torch.Tensor, spec: Any) -> torch.Tensor:
    """A decoded image ([C, H, W], uint8 or float) with a spec's on-load geometry: ``size`` (squashes), or
    ``short_side`` then ``crop`` (the evaluation transform)."""
    from torchvision.transforms.v2 import functional as TF

    if spec.size is not None:
        size = [spec.size] * 2 if isinstance(spec.size, int) else list(spec.size)
        x = TF.resize(x, size, antialias=True)
    if spec.short_side is not None or spec.crop is not None:
        from .imaging import geometry

        x = geometry(x, short_side=spec.short_side, crop=spec.crop, interpolation=spec.interpolation)
    return x


FAST_DECODE = (".jpg", ".jpeg", ".png", ".gif", ".webp")


def read_image(path: str, mode: str = "RGB") -> torch.Tensor:
    """An image file as uint8 ``[C, H, W]``, exactly the pixels ``PIL.Image.open(path).convert(mode)`` gives.

    RGB from JPEG, PNG, GIF and WebP goes through torchvision.io (libjpeg-turbo, libpng, libwebp without PIL's
    per-image object overhead), whose output is bit-identical to PIL's for these (tests cover grey, palette,
    alpha, CMYK and progressive files). Everything else, and anything torchvision.io cannot decode to 8-bit RGB
    (16-bit PNGs, a truncated file), is read by PIL as before: the pixels, and so the stores, do not depend on
    which decoder ran."""
    decode = _fast_decoder() if mode == "RGB" and path.lower().endswith(FAST_DECODE) else None
    if decode is not None:
        try:
            with open(path, "rb") as f:
                x = decode(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
        except (OSError, RuntimeError, ValueError):  # unreadable, empty or not decodable there: PIL decides (and words the error)
            x = None
        if x is not None and x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 3:
            return x
    return _read_image_pil(path, mode)


@functools.cache
def _fast_decoder():
    """torchvision.io's RGB decoder, or None where this torchvision has none (its image codecs are deprecated
    from 0.29 in favour of TorchCodec; PIL then reads everything)."""
    import warnings

    try:
        import torchvision.io as tio

        decode_image, rgb = tio.decode_image, tio.ImageReadMode.RGB
    except (ImportError, AttributeError):
        return None

    def decode(data: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(data, mode=rgb)

    return decode


def _read_image_pil(path: str, mode: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as im:
            return TF.pil_to_tensor(im.convert(mode))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataNotFoundError(f"cannot read image {path}: {exc}") from exc


def _list_images(root: Path, sub: str) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, size, mtime_ns) of every image file under ``root/sub``, in the order
    ``sorted(Path.rglob("*"))`` gives (by path components); symlinked files count, symlinked folders are not
    entered. One stat per image: the fingerprint's manifest reuses it."""
    out: list[tuple[str, int, int]] = []
    stack = [sub]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = list(os.scandir(root / rel_dir if rel_dir else root))
        except OSError as exc:
            raise DataNotFoundError(f"cannot list {root / rel_dir}: {exc}") from exc
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                stack.append(rel)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS) and e.name.rfind(".") > 0:  # ".png" has no suffix
                try:
                    st = e.stat()  # follows a symlink: its target must be a regular file
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((rel, st.st_size, st.st_mtime_ns))
    out.sort(key=lambda e: e[0].replace("/", "\0"))  # by path components: "/" sorts below every name's characters
    return out


class Reordered(TransferSet):
    """A transfer set read in another order: position ``p`` is sample ``order[p]``. Generation writes a
    store's rows through it, so a class-sorted folder becomes a well-mixed store (``index`` records
    each row's sample, and everything downstream reads samples through ``index``)."""

    def __init__(self, base: TransferSet, order: np.ndarray):
        if len(order) != len(base):
            raise SpecError(f"a row order over {len(order)} samples does not fit a transfer set of {len(base)}")
        self.base, self.order = base, np.asarray(order, dtype=np.int64)
        self.spec, self.class_names, self.decodes = base.spec, base.class_names, base.decodes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[int(self.order[i])]

    def get_batch(self, rows):
        return self.base.get_batch(self.order[np.asarray(rows, dtype=np.int64)])

    def sample_of(self, rows: np.ndarray) -> np.ndarray:
        return self.order[np.asarray(rows, dtype=np.int64)]

    def labels(self) -> np.ndarray:
        return self.base.labels()[self.order]

    @property
    def fingerprint(self) -> str:  # the content is the base set's, whatever the order
        return self.base.fingerprint


class WrappedSet(TransferSet):
    """A torchvision or user dataset; samples are converted to float tensors."""

    def __init__(self, spec: DataSpec, dataset: Any, root: Path | None = None):
        self.spec, self.dataset, self.root = spec, dataset, root
        classes = getattr(dataset, "classes", None)
        self.class_names = [str(c) for c in classes] if classes is not None else None
        try:
            self._len = int(len(dataset))
        except (TypeError, NotImplementedError, ValueError) as exc:
            raise SpecError(f"the dataset {type(dataset).__name__} must have a length (a map-style dataset)") from exc

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as TF

        item = self.dataset[i]
        if isinstance(item, dict):
            raise SpecError(f"the dataset {type(self.dataset).__name__} yields dicts (keys {', '.join(map(str, item))}), "
                            "not (input, label) pairs: for a Hugging Face dataset saved to disk use kind: huggingface "
                            "with image: and label: naming its columns, or return pairs from the factory")
        x, y = item if isinstance(item, (tuple, list)) else (item, -1)
        if not isinstance(x, torch.Tensor):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            else:  # PIL image
                x = TF.to_dtype(TF.to_image(x), torch.float32, scale=True)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return x.float(), int(y) if y is not None else -1

    @cached_property
    def fingerprint(self) -> str:
        """A torchvision set's is kept while no file under its root changes (size, mtime); a factory's
        (user code: nothing says what it reads) is computed every time."""
        if self.root is None:
            return self._fingerprint()
        key = f"torchvision:{self.root}:{self.spec.model_dump_json()}"
        return cached_whole("torchvision", key, files_under(self.root), self._fingerprint, self.fingerprints,
                            self.fingerprint_report)


class HuggingFaceSet(TransferSet):
    """A Hugging Face dataset saved to disk (``save_to_disk``), read with ``datasets.load_from_disk`` (memory-
    mapped Arrow: nothing is downloaded, nothing loaded whole). Its fingerprint is the dataset's own (recorded
    when it was saved) with the columns and geometry darkstore reads it with."""

    def __init__(self, spec: HuggingFaceSpec, root: Path):
        try:
            import datasets
        except ImportError as exc:
            raise SpecError("kind: huggingface needs the datasets package: pip install 'darkstore[hf]'") from exc
        if not root.exists():
            raise DataNotFoundError(f"dataset folder not found: {root}")
        try:
            ds = datasets.load_from_disk(str(root))
        except (FileNotFoundError, ValueError) as exc:
            raise DataNotFoundError(f"{root} is not a dataset saved with save_to_disk: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise SpecError(f"{root} holds the splits {', '.join(ds)}: name one with split:")
            ds = ds[spec.split]
        missing = [c for c in (spec.image, spec.label) if c is not None and c not in ds.column_names]
        if missing:
            raise SpecError(f"{root} has no column {missing[0]!r}; its columns: {', '.join(ds.column_names)} "
                            "(name them with image: and label:)")
        self.spec, self.root, self.dataset = spec, root, ds
        # an Image feature decodes to PIL (then converted to mode, as image folders are); arrays come as numpy,
        # in their stored dtype
        self._images = isinstance(ds.features[spec.image], datasets.Image)
        self._column = ds if self._images else ds.with_format("numpy", columns=[spec.image])
        self._dtype = None if self._images else _declared_dtype(ds.features[spec.image])
        feature = ds.features.get(spec.label) if spec.label else None
        self.class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        self._labels = (np.asarray(ds[spec.label], dtype=np.int64) if spec.label
                        else np.full(len(ds), -1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as TF

        value = self._column[int(i)][self.spec.image]
        if self._images:
            x = TF.pil_to_tensor(value.convert(self.spec.mode))
        else:  # numpy may widen the stored dtype: the feature's declared one decides (uint8: 8-bit pixels)
            x = torch.as_tensor(np.asarray(value, dtype=self._dtype))
        x = TF.to_dtype(x, torch.float32, scale=True) if x.dtype == torch.uint8 else x.float()
        return _load_geometry(x, self.spec), int(self._labels[i])

    def get_batch(self, rows):
        xs = [self[int(i)][0] for i in rows]
        if len({tuple(x.shape) for x in xs}) > 1:
            raise SpecError(f"the images of {self.root} differ in size; set short_side: and crop: or size:")
        return torch.stack(xs), torch.from_numpy(self._labels[np.asarray(rows, dtype=np.int64)])

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    @cached_property
    def fingerprint(self) -> str:
        """The dataset's own fingerprint (datasets records it at save time; it changes with every transform
        applied before saving), with how darkstore reads it."""
        how = self.spec.model_dump(mode="json", exclude={"root"})
        blob = json.dumps({"huggingface": self.dataset._fingerprint, "rows": len(self.dataset), **how},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _declared_dtype(feature: Any) -> str | None:
    """The element dtype a datasets feature declares (Array2D/3D, Value, nested Sequence/list)."""
    while feature is not None:
        dtype = getattr(feature, "dtype", None)
        if isinstance(dtype, str) and dtype not in ("list", "dict"):
            return dtype
        feature = getattr(feature, "feature", None) or (feature[0] if isinstance(feature, list) and feature else None)
    return None
