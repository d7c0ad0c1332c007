"""Batched image kernels with per-row parameters: the definition of recipe version 2's views.

Every function takes a batch ``x`` [B, C, H, W] (float) and per-row parameters, runs on ``x``'s device,
and gives each row the pixels it would get alone: the kernels are elementwise, or reduce only within a
row (a grayscale mean, a resampling matrix product), so a row's pixels do not depend on the batch around
it (tests check it). They are written as plain sequences of tensor operations — a product and a sum are
two operations, never one fused multiply-add with an ``alpha`` — so the same device type and library give
the same bits; another device type (a GPU against the CPU, another CPU vector unit) rounds differently,
which :mod:`darkstore.views` bounds with a stated tolerance.

The operations mean what torchvision's transforms v2 mean (tests compare each with torchvision's
functional form within float rounding): antialiased bilinear resampling as PIL and torchvision compute it,
ITU-R 601 grayscale, blends clamped to [0, 1], hue rotation through HSV, bilinear affine sampling with
zero fill.
"""

from __future__ import annotations

import numpy as np
import torch


def _rows(v: np.ndarray | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row values as a [B, 1, 1, 1] tensor of x's dtype on x's device."""
    t = torch.as_tensor(np.asarray(v, dtype=np.float64) if not torch.is_tensor(v) else v)
    return t.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _keep_where(identity: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y, except rows whose parameter is the identity, which keep x untouched (no clamp either)."""
    if not identity.any():
        return y
    keep = torch.as_tensor(identity, device=x.device).view(-1, 1, 1, 1)
    return torch.where(keep, x, y)


# --- resampling -----------------------------------------------------------------------------------

def resample_matrix(start: np.ndarray, length: np.ndarray, out: int, size: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """[B, out, size]: output pixel i of row b as a weighted sum of input pixels start[b] … start[b] +
    length[b] − 1 — antialiased bilinear (a triangle filter widened by the downscaling factor, PIL's and
    torchvision's ``antialias=True``), each output's weights normalised to sum to one. Computed in float64,
    then rounded to ``dtype``."""
    start = torch.as_tensor(np.asarray(start, dtype=np.float64), device=device).view(-1, 1, 1)
    length = torch.as_tensor(np.asarray(length, dtype=np.float64), device=device).view(-1, 1, 1)
    scale = length / out
    support = torch.clamp(scale, min=1.0)
    centre = (torch.arange(out, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    j = torch.arange(size, device=device, dtype=torch.float64).view(1, 1, -1) - start  # relative to the crop
    w = torch.clamp(1.0 - torch.abs(j + 0.5 - centre) / support, min=0.0)
    w = torch.where((j >= 0) & (j < length), w, torch.zeros((), dtype=torch.float64, device=device))
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def resized_crop(x: torch.Tensor, top, left, height, width, size: tuple[int, int]) -> torch.Tensor:
    """Each row's crop [top, top + height) × [left, left + width), resampled to ``size``: rows first, then
    columns, as two matrix products."""
    _, _, h, w = x.shape
    wy = resample_matrix(top, height, size[0], h, x.device, x.dtype)  # [B, H', H]
    wx = resample_matrix(left, width, size[1], w, x.device, x.dtype)  # [B, W', W]
    return torch.matmul(torch.matmul(wy.unsqueeze(1), x), wx.transpose(1, 2).unsqueeze(1))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The whole image resampled to ``size`` (the crop that is the image)."""
    b, _, h, w = x.shape
    return resized_crop(x, np.zeros(b), np.zeros(b), np.full(b, h), np.full(b, w), size)


# --- geometry -------------------------------------------------------------------------------------

def affine(x: torch.Tensor, angle: np.ndarray, tx: np.ndarray, ty: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """Rotation by ``angle`` degrees about the centre, scaling and a whole-pixel shift; bilinear sampling,
    zero outside the image (torchvision's affine without shear). The inverse map is computed in float64
    per row, the sampling grid in x's dtype."""
    b, _, h, w = x.shape
    rot = np.radians(np.asarray(angle, dtype=np.float64))
    s = np.asarray(scale, dtype=np.float64)
    tx, ty = np.trunc(np.asarray(tx, dtype=np.float64)), np.trunc(np.asarray(ty, dtype=np.float64))
    a, bb = np.cos(rot) / s, np.sin(rot) / s  # the inverse rotation-scale [[a, bb], [-bb, a]]
    theta = np.stack([a, bb, a * -tx + bb * -ty, -bb, a, -bb * -tx + a * -ty], axis=1).reshape(b, 2, 3)
    theta = torch.as_tensor(theta, device=x.device).to(x.dtype)
    base = torch.empty(1, h, w, 3, dtype=x.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, dtype=x.dtype, device=x.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, dtype=x.dtype,
                                      device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    half = torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype, device=x.device)
    grid = torch.matmul(base.view(1, h * w, 3), theta.transpose(1, 2) / half).view(b, h, w, 2)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def hflip(x: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    flip = np.asarray(flip) != 0
    if not flip.any():
        return x
    return torch.where(torch.as_tensor(flip, device=x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def box_paste(x: torch.Tensor, xp: torch.Tensor, y0, x0, y1, x1) -> torch.Tensor:
    """x with each row's box [y0, y1) × [x0, x1) taken from xp (CutMix)."""
    _, _, h, w = x.shape
    dev = x.device
    ys = torch.arange(h, device=dev).view(1, -1, 1)
    xs = torch.arange(w, device=dev).view(1, 1, -1)
    col = (lambda v: torch.as_tensor(np.asarray(v, dtype=np.int64), device=dev).view(-1, 1, 1))  # noqa: E731
    inside = (ys >= col(y0)) & (ys < col(y1)) & (xs >= col(x0)) & (xs < col(x1))
    return torch.where(inside.unsqueeze(1), xp, x)


def blend(x: torch.Tensor, xp: torch.Tensor, lam: np.ndarray) -> torch.Tensor:
    """λ·x + (1 − λ)·xp per row (MixUp), with λ and 1 − λ each rounded to x's dtype."""
    return x * _rows(lam, x) + xp * _rows(1 - np.asarray(lam, dtype=np.float64), x)


# --- colour ---------------------------------------------------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: ITU-R 601 luma of RGB rows (a one-channel image is its own)."""
    if x.shape[1] == 1:
        return x
    return x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def _mix(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x * f + other * (1.0 - f), 0.0, 1.0)


def brightness(x: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    return _keep_where(np.asarray(factor) == 1, x, torch.clamp(x * _rows(factor, x), 0.0, 1.0))


def contrast(x: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """Blend with the row's mean gray level (accumulated in float64, so the sum's order does not matter)."""
    mean = grayscale(x).double().mean(dim=(-3, -2, -1), keepdim=True).to(x.dtype)
    return _keep_where(np.asarray(factor) == 1, x, _mix(x, mean, _rows(factor, x)))


def saturation(x: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return _keep_where(np.asarray(factor) == 1, x, _mix(x, grayscale(x), _rows(factor, x)))


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    flat = maxc == minc
    one = torch.ones_like(maxc)
    chroma = maxc - minc
    s = chroma / torch.where(flat, one, maxc)
    c = torch.where(flat, one, chroma)
    rc, gc, bc = (maxc - r) / c, (maxc - g) / c, (maxc - b) / c
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    sector = torch.remainder(i.to(torch.int64), 6)
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, rgb in table.items():
        here = sector == k
        out = [torch.where(here, c, o) for c, o in zip(rgb, out)]
    return torch.stack(out, dim=1)


def hue(x: torch.Tensor, shift: np.ndarray) -> torch.Tensor:
    """Rotate each row's hue by ``shift`` turns (in [−0.5, 0.5]) through HSV."""
    if x.shape[1] == 1:
        return x
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + _rows(shift, x).view(-1, 1, 1), 1.0)
    return _keep_where(np.asarray(shift) == 0, x, _hsv_to_rgb(h, s, v))
