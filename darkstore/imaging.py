"""Image geometry shared by the transfer sets (per image, at decode) and the models' preprocessing (per batch,
on the device): the standard evaluation transform of ImageNet-style weights is "resize the shorter side to S,
then centre-crop C" (torchvision's ``Resize(S)`` + ``CenterCrop(C)``), which a square ``size``/``resize``
cannot express without squashing the image."""

from __future__ import annotations

from typing import Literal

import torch

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
            from darkstore.errors import SpecError

            raise SpecError(f"crop {crop} is larger than the image ({x.shape[-2]}x{x.shape[-1]} after any resize)")
        x = TF.center_crop(x, size)
    return x
