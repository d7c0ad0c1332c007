"""Image geometry shared by the transfer sets (per image, at decode) and the models' preprocessing (per batch,
on the device): the standard evaluation transform of ImageNet-style weights is "resize the shorter side to S,
then centre-crop C" (torchvision's ``Resize(S)`` + ``CenterCrop(C)``), which a square ``size``/``resize``
cannot express without squashing the image."""

from __future__ import annotations

import math
from typing import Literal

import torch
from darkstore.errors import SpecError

Interpolation = Literal["bilinear", "bicubic", "nearest"]


def pair(v: int | tuple[int, int] | list[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(s) for s in v]


def geometry(x: torch.Tensor, *, short_side: int | None = None, crop: int | tuple[int, int] | None = None,
             interpolation: Interpolation = "bilinear") -> torch.Tensor:
    """``x`` ([..., H, W]) with its shorter side resized to ``short_side`` (aspect kept, antialiased), then
    centre-cropped to ``crop`` — torchvision's ``Resize(short_side, interpolation, antialias=True)`` then
    ``CenterCrop(crop)``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if short_side is not None and min(x.shape[-2:]) != short_side:
        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                "nearest": InterpolationMode.NEAREST}[interpolation]
        x = TF.resize(x, [short_side], interpolation=mode, antialias=interpolation != "nearest")
    if crop is not None:
        size = pair(crop)
        if size[0] > x.shape[-2] or size[1] > x.shape[-1]:
            raise SpecError(f"crop {crop} is larger than the image ({x.shape[-2]}x{x.shape[-1]} after any resize)")
        x = TF.center_crop(x, size)
    return x


def preset_values(name: str) -> dict:
    """The evaluation transform published with a model's weights, as ``Preprocess`` options: ``torchvision/
    <Weights>.<NAME>`` reads torchvision's own ``ImageClassification`` preset (no download: it is metadata),
    ``timm/<model>`` timm's pretrained config (``crop_pct`` gives the shorter side, as timm's eval transform)."""
    source, _, ref = name.partition("/")
    if source == "torchvision" and ref:
        return _torchvision_preset(ref)
    if source == "timm" and ref:
        return _timm_preset(ref)
    raise SpecError(f"preset {name!r}: name torchvision/<Weights>.<NAME> (e.g. torchvision/ResNet50_Weights."
                    "IMAGENET1K_V2) or timm/<model> (e.g. timm/resnet50.a1_in1k)")


def _torchvision_preset(ref: str) -> dict:
    from torchvision.models import get_weight
    from torchvision.transforms._presets import ImageClassification

    try:
        preset = get_weight(ref).transforms()
    except (ValueError, KeyError, AttributeError) as exc:
        raise SpecError(f"preset torchvision/{ref}: torchvision has no such weights ({exc}); names look like "
                        "ResNet50_Weights.IMAGENET1K_V2") from exc
    if not isinstance(preset, ImageClassification):
        raise SpecError(f"preset torchvision/{ref} is a {type(preset).__name__}, not an image classification "
                        "transform")
    interpolation = preset.interpolation.value
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise SpecError(f"preset torchvision/{ref} resamples with {interpolation}, which darkstore does not offer")
    resize, crop = list(preset.resize_size), list(preset.crop_size)
    return {"short_side": resize[0] if len(resize) == 1 else None, "resize": resize if len(resize) == 2 else None,
            "crop": crop[0] if len(crop) == 1 else crop, "interpolation": interpolation,
            "mean": list(preset.mean), "std": list(preset.std)}


def _timm_preset(ref: str) -> dict:
    try:
        import timm
    except ImportError as exc:
        raise SpecError(f"preset timm/{ref} needs timm: pip install 'darkstore[timm]'") from exc
    cfg = timm.models.get_pretrained_cfg(ref)
    if cfg is None:
        raise SpecError(f"preset timm/{ref}: timm knows no pretrained config of that name (timm.list_pretrained())")
    _, h, w = cfg.input_size
    crop_pct, mode = cfg.crop_pct or 0.875, cfg.crop_mode or "center"
    if mode not in ("center", "squash") or (mode == "center" and h != w):
        raise SpecError(f"preset timm/{ref}: crop mode {mode!r} on {h}x{w} is not offered (center on square "
                        "inputs and squash are)")
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    scale = [int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct))]
    geometry = {"short_side": scale[0]} if mode == "center" else {"resize": scale}
    return {**geometry, "crop": h if h == w else [h, w], "interpolation": interpolation, "mean": list(cfg.mean),
            "std": list(cfg.std)}
