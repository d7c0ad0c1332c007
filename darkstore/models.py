"""Architecture registry and safe model loading, shared by teachers and students.

An architecture is a built-in (``mlp``, ``small_cnn``) for small inputs or any
torchvision classification model (``resnet18``, ``mobilenet_v3_small`` …).
Weights load from safetensors or from a ``torch.load(weights_only=True)`` state
dict — never by full unpickling. TorchScript, ``torch.export`` archives and
``module:function`` factories carry code and load only with ``allow_code``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from darkstore.errors import (
    CodeNotAllowedError,
    SpecError,
    UnknownArchitectureError,
    UnsafeWeightsError,
    WeightsError,
    WeightsNotFoundError,
)

from .modelspec import CODE_FORMATS, ModelSpec, Preprocess, WeightFormat  # noqa: F401 — re-exported
from .paths import import_callable, resolve


# --- built-in architectures -----------------------------------------------------
class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks. ``in_features`` must be given."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv stages with max-pool, global average pool, linear head.
    Works for any image size ≥ 4 px (digits 8x8, CIFAR 32x32)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ThinCNN(nn.Module):
    """A thin, deep CNN in the FitNets mould: ``depth`` 3x3 conv-BN-ReLU blocks of ``width`` channels (the
    width doubling once, at a 2x2 max-pool after the first half), global average pool, linear head. Each
    block is one module, ``blocks.i``: a hint guides one of them (``--student-layer blocks.2``)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 8, depth: int = 6, dropout: float = 0.0):
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2")
        blocks, c = [], in_channels
        for i in range(depth):
            w = width if i < depth // 2 else 2 * width
            layers = [nn.MaxPool2d(2)] if i == depth // 2 else []
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


from .gpt import GPT  # noqa: E402 — a language model: num_classes is its vocabulary size

BUILTINS = {"mlp": MLP, "small_cnn": SmallCNN, "thin_cnn": ThinCNN, "gpt": GPT}


def torchvision_classifiers() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_architectures() -> list[str]:
    return sorted(BUILTINS) + torchvision_classifiers()


def build_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A freshly initialised model of a registered architecture."""
    if "num_classes" in kwargs:  # said twice: once is enough, twice differently is a mistake
        if kwargs["num_classes"] != num_classes:
            raise SpecError(f"arch_kwargs say num_classes {kwargs['num_classes']} for {arch}, but it is built for "
                            f"{num_classes} classes (the member's or the ensemble's num_classes): give it once")
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    if arch in BUILTINS:
        try:
            return BUILTINS[arch](num_classes=num_classes, **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpecError(f"bad arch_kwargs for {arch}: {exc}") from exc
    if arch.startswith("timm/"):
        return _build_timm(arch.removeprefix("timm/"), num_classes, **kwargs)
    import torchvision

    if arch not in torchvision_classifiers():
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}: not a built-in ({', '.join(sorted(BUILTINS))}), "
            "a torchvision classification model (see `darkstore archs`) nor timm/<model>"
        )
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise SpecError(f"bad arch_kwargs for {arch}: {exc}") from exc


def _build_timm(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A timm model by name, randomly initialised (``pretrained=False``: nothing is downloaded; weights load
    from a local file like any other architecture's)."""
    try:
        import timm
    except ImportError as exc:
        raise UnknownArchitectureError(f"timm/{name} needs timm: pip install 'darkstore[timm]'") from exc
    if not timm.is_model(name.split(".", 1)[0]):
        raise UnknownArchitectureError(f"unknown architecture timm/{name}: timm has no such model "
                                       "(timm.list_models())")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise SpecError(f"bad arch_kwargs for timm/{name}: {exc}") from exc


# --- safe weight loading ---------------------------------------------------------
_DIGESTS: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime) so a service hashes a
    multi-GB weight file once, not at every submit."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if len(_DIGESTS) > 4096:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def detect_format(path: Path, declared: WeightFormat) -> str:
    if declared != "auto":
        return declared
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix == ".pt2":
        return "export"
    return "state_dict"


def load_state_dict(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Load tensors only. A pickle that would run code is refused, never executed."""
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        reason = next((ln.strip() for ln in text.splitlines() if "global" in ln.lower()), None)
        if reason is None and "Weights only load failed" in text:
            # refused for another reason (an opcode the safe unpickler lacks): a plain pickle with
            # code in it, or just bytes that are no pickle at all? Read the opcodes, run nothing.
            found = _pickle_code_refs(path)
            if found:
                reason = "it references " + ", ".join(found[:5])
        if reason is None:  # not refused for code: the bytes are simply not a valid state dict
            raise WeightsError(f"{path} is not a readable PyTorch state dict: {text.strip()[:300]}") from exc
        raise UnsafeWeightsError(
            f"{path} is a pickle that needs code to load ({reason[:200]}). darkstore loads only "
            "safetensors or plain state dicts (torch.load weights_only=True) and never unpickles code; "
            "re-save it with `torch.save(model.state_dict(), path)` or safetensors.torch.save_file"
        ) from exc
    except Exception as exc:  # truncated zip, random bytes, …: torch raises many types
        raise WeightsError(f"{path} is not a readable PyTorch state dict: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


def _pickle_code_refs(path: Path) -> list[str]:
    """Callables a pickle would import or call, read with ``pickletools`` (nothing is executed).
    Empty when the file is no valid pickle or calls nothing."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            data = Path(path).read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name in _CODE_OPS and not found:
                found.append(f"opcode {op.name}")
        return found
    except Exception:  # noqa: BLE001 — not a pickle (random bytes, truncated): no code found
        return []


def _check_code(fmt: str, ref: str, allow_code: bool) -> None:
    if not allow_code:
        raise CodeNotAllowedError(
            f"{ref} is a {fmt} file, which carries code; enable it with --allow-code (CLI) "
            "or DARKSTORE_ALLOW_CODE=true (service)"
        )


@dataclass
class LoadedModel:
    """A model ready for inference (or training), with its provenance."""

    spec: ModelSpec
    module: nn.Module
    format: str
    weights_path: Path | None
    sha256: str | None

    @property
    def name(self) -> str:
        return self.spec.label

    @property
    def num_params(self) -> int:
        return count_params(self.module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.module(preprocess(x, self.spec.preprocess)))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params_meta(spec: ModelSpec, num_classes: int | None) -> int:
    """Parameters of ``spec``'s architecture, built on the meta device: nothing is allocated."""
    c = spec.num_classes or num_classes or 2
    with torch.device("meta"):
        return count_params(build_model(spec.arch, c, **spec.arch_kwargs))


def logits_of(out: Any) -> torch.Tensor:
    """Torchvision models may return named tuples in training mode (inception, googlenet)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise SpecError(f"model returned {type(out).__name__}, expected a logits tensor")


def load_model(
    spec: ModelSpec,
    *,
    num_classes: int | None = None,
    allow_code: bool = False,
    base_dir: str | Path | None = None,
    roots: Sequence[str | Path] | None = None,
    require_weights: bool = True,
) -> LoadedModel:
    """Build ``spec``'s model and load its weights safely."""
    c = spec.num_classes or num_classes
    path = resolve(spec.weights, base_dir=base_dir, roots=roots) if spec.weights else None
    if path is not None and not path.is_file():
        raise WeightsNotFoundError(f"weights of {spec.label!r} not found: {path}")
    fmt = detect_format(path, spec.format) if path else "none"
    digest = sha256_file(path) if path else None

    if spec.factory is not None:
        fn = import_callable(spec.factory, allow_code=allow_code, what="model factory")
        module = fn(**spec.arch_kwargs)
        if not isinstance(module, nn.Module):
            raise SpecError(f"factory {spec.factory} returned {type(module).__name__}, not a torch.nn.Module")
        if path is not None:
            _load_into(module, load_state_dict(path, fmt), path, spec.key_map, label=spec.label)
        return LoadedModel(spec, module, "factory", path, digest)

    if fmt in CODE_FORMATS:
        _check_code(fmt, str(path), allow_code)
        try:
            if fmt == "torchscript":
                module = torch.jit.load(str(path), map_location="cpu")
            else:
                module = torch.export.load(str(path)).module()
        except Exception as exc:  # torch raises many types for a broken archive
            raise WeightsError(f"cannot load {fmt} file {path}: {exc}") from exc
        return LoadedModel(spec, module, fmt, path, digest)

    if c is None:
        raise SpecError(f"{spec.label!r}: num_classes is unknown; set it on the model or the ensemble")
    module = build_model(spec.arch, c, **spec.arch_kwargs)
    if path is not None:
        _load_into(module, load_state_dict(path, fmt), path, spec.key_map, label=spec.label, num_classes=c)
    elif require_weights:
        raise SpecError(f"{spec.label!r} names no weights; a teacher without weights would be random")
    return LoadedModel(spec, module, fmt, path, digest)


def remap_keys(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by prefix (the longest matching prefix wins); two keys landing on one name is an error."""
    if not key_map:
        return state
    prefixes = sorted(key_map, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        p = next((p for p in prefixes if k.startswith(p)), None)
        new = key_map[p] + k[len(p):] if p is not None else k
        if new in out:
            raise WeightsError(f"key_map maps two weights onto {new!r}")
        out[new] = v
    return out


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path,
               key_map: dict[str, str] | None = None, *, label: str | None = None,
               num_classes: int | None = None) -> None:
    state = remap_keys(state, key_map or {})
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        who = f"{label!r}: " if label else ""
        raise WeightsError(f"{who}{path} does not fit the architecture: "
                           f"{_misfit(module.state_dict(), state, num_classes)}") from exc


def _misfit(model: dict[str, torch.Tensor], file: dict[str, torch.Tensor], num_classes: int | None) -> str:
    """Why a state dict does not load, in the terms a user acts on: the head's class count, a deeper or
    shallower variant, another configuration, or other key names (where a key_map helps)."""
    missing = [k for k in model if k not in file]
    extra = [k for k in file if k not in model]
    shapes = [k for k in model if k in file and tuple(model[k].shape) != tuple(file[k].shape)]
    heads = {int(file[k].shape[0]) for k in shapes if model[k].ndim and file[k].ndim
             and int(model[k].shape[0]) == num_classes and model[k].shape[1:] == file[k].shape[1:]}
    if shapes and not missing and not extra and len(heads) == 1 and len(shapes) <= 2:
        k = heads.pop()
        return (f"its head has {k} classes, the model is built for {num_classes} (the member's num_classes, else "
                f"the ensemble's or the transfer set's): set num_classes: {k} on it, or give weights for "
                f"{num_classes} classes")
    if shapes and not missing and not extra:
        k = shapes[0]
        return (f"{len(shapes)} tensor(s) have other shapes ({k}: file {list(file[k].shape)}, model "
                f"{list(model[k].shape)}): the weights are of another configuration (width, arch_kwargs)")
    overlap = len(set(model) & set(file)) / max(1, len(model))
    if overlap > 0.5 and extra and not missing:
        return (f"the file has {len(extra)} weights the model lacks ({', '.join(extra[:3])}…): it holds a larger "
                "variant (deeper or with more blocks, e.g. resnet34 weights under arch resnet18)")
    if overlap > 0.5 and missing and not extra:
        return (f"the model has {len(missing)} weights the file lacks ({', '.join(missing[:3])}…): it holds a "
                "smaller variant (shallower, e.g. resnet18 weights under arch resnet34)")
    return (f"{len(missing)} of the model's weights are not in the file and {len(extra)} of the file's are not in "
            f"the model (file keys start {', '.join(list(file)[:3])}; the model's {', '.join(list(model)[:3])}): "
            "if only the names differ, a key_map renames keys by prefix")


def save_weights(module: nn.Module, path: str | Path) -> str:
    """Save a state dict as safetensors; returns its sha256. Tensors tied to each other (a language model's
    input embedding and output head) are saved once (safetensors' ``save_model``; ``load_model`` restores them)."""
    from safetensors.torch import save_file, save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    storages = [v.untyped_storage().data_ptr() for v in state.values() if v.numel()]
    if len(set(storages)) < len(storages):
        save_model(module, str(path))
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
    return sha256_file(path)


# --- preprocessing -------------------------------------------------------------
def preprocess(x: torch.Tensor, p: Preprocess) -> torch.Tensor:
    if p.channels is not None and x.ndim == 4 and x.shape[1] != p.channels:
        if x.shape[1] != 1:
            raise SpecError(f"cannot turn {x.shape[1]}-channel input into {p.channels} channels")
        x = x.expand(-1, p.channels, -1, -1)
    if p.resize is not None:
        if x.ndim != 4:
            raise SpecError("resize needs image input [B, C, H, W]")
        size = (p.resize, p.resize) if isinstance(p.resize, int) else tuple(p.resize)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if p.short_side is not None or p.crop is not None:
        if x.ndim != 4:
            raise SpecError("short_side and crop need image input [B, C, H, W]")
        from .imaging import geometry

        x = geometry(x, short_side=p.short_side, crop=p.crop, interpolation=p.interpolation)
    if p.mean is not None:
        mean = torch.tensor(p.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(p.std, dtype=x.dtype, device=x.device)
        if x.ndim == 4:
            mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        x = (x - mean) / std
    return x
