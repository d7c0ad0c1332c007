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


def _rows(v: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Per-row values as a [B, 1, 1, 1] tensor of x's dtype on x's device."""
    return torch.as_tensor(np.asarray(v, dtype=np.float64)).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _keep_where(identity: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y, except rows whose parameter is the identity, which keep x untouched (no clamp either)."""
    if not identity.any():
        return y
    keep = torch.as_tensor(identity, device=x.device).view(-1, 1, 1, 1)
    return torch.where(keep, x, y)


# --- resampling -----------------------------------------------------------------------------------

def resample_taps(start: np.ndarray, length: np.ndarray, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel i of row b as a weighted sum of a few input pixels of the crop start[b] … start[b] +
    length[b] − 1: antialiased bilinear, PIL's and torchvision's ``antialias=True`` (a triangle filter widened
    by the downscaling factor; plain bilinear when upscaling), each output's weights normalised to sum to
    one. Returns ([B, out, T] input indices, [B, out, T] float64 weights); unused taps have weight 0."""
    start = np.asarray(start, dtype=np.float64).reshape(-1, 1)
    length = np.asarray(length, dtype=np.float64).reshape(-1, 1)
    scale = length / out
    support = np.maximum(scale, 1.0)
    centre = (np.arange(out, dtype=np.float64) + 0.5) * scale  # [B, out], in the crop's pixels
    lo = np.maximum(np.floor(centre - support + 0.5), 0)
    hi = np.minimum(np.floor(centre + support + 0.5), length)
    taps = int((hi - lo).max())
    j = lo[..., None] + np.arange(taps)  # [B, out, T]
    w = np.maximum(0.0, 1.0 - np.abs(j + 0.5 - centre[..., None]) / support[..., None])
    w = np.where(j < hi[..., None], w, 0.0)
    w /= w.sum(-1, keepdims=True)
    index = np.minimum(j, length[..., None] - 1) + start[..., None]
    return index.astype(np.int64), w


def _resample(x: torch.Tensor, dim: int, start, length, out: int) -> torch.Tensor:
    """x resampled along ``dim`` (2: rows, 3: columns) tap by tap, in a fixed order: products and sums
    over a handful of taps, never a matrix product whose summation order depends on the batch's shape.
    Each tap picks whole lines (rows, or columns of the transposed image) with one ``index_select``."""
    index, w = resample_taps(start, length, out)
    b, c = x.shape[:2]
    if dim == 3:
        x = x.transpose(2, 3)
    n = x.shape[2]
    lines = x.permute(0, 2, 1, 3).reshape(b * n, c * x.shape[3])  # [B·N, C·L]: one line per input row
    flat = torch.as_tensor(index + (np.arange(b) * n).reshape(-1, 1, 1), device=x.device)  # [B, out, T]
    wt = torch.as_tensor(w, device=x.device).to(x.dtype)
    acc = None
    for t in range(index.shape[-1]):
        term = lines.index_select(0, flat[..., t].reshape(-1)) * wt[..., t].reshape(-1, 1)
        acc = term if acc is None else acc + term
    y = acc.view(b, out, c, x.shape[3]).permute(0, 2, 1, 3)
    return (y.transpose(2, 3) if dim == 3 else y).contiguous()


def _bilinear(x: torch.Tensor, top, left, height, width, size: tuple[int, int]) -> torch.Tensor:
    """Upscaling crops: the same triangle filter is plain bilinear interpolation at source coordinate
    (i + 0.5)·scale − 0.5, clamped to the crop — one ``grid_sample`` for the batch."""
    _, _, h, w = x.shape

    def coords(start, length, out, full):
        start = np.asarray(start, dtype=np.float64).reshape(-1, 1)
        length = np.asarray(length, dtype=np.float64).reshape(-1, 1)
        src = np.clip((np.arange(out) + 0.5) * (length / out) - 0.5, 0.0, length - 1) + start
        return torch.as_tensor((2.0 * src + 1.0) / full - 1.0, device=x.device).to(x.dtype)  # grid units

    gy = coords(top, height, size[0], h)[:, :, None].expand(-1, -1, size[1])
    gx = coords(left, width, size[1], w)[:, None, :].expand(-1, size[0], -1)
    return torch.nn.functional.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear",
                                           padding_mode="border", align_corners=False)


def resized_crop(x: torch.Tensor, top, left, height, width, size: tuple[int, int]) -> torch.Tensor:
    """Each row's crop [top, top + height) × [left, left + width), resampled to ``size`` by the antialiased
    triangle filter: a row whose crop is no larger than ``size`` on either side (upscaling, where the filter
    is bilinear interpolation) in one ``grid_sample``; the others rows first, then columns, tap by tap.
    Which path a row takes depends on its own crop only, never on its batch."""
    top, left, height, width = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (top, left, height, width))
    up = (height <= size[0]) & (width <= size[1])
    if up.all():
        return _bilinear(x, top, left, height, width, size)
    down = lambda rows: _resample(_resample(rows, 2, top[~up], height[~up], size[0]), 3, left[~up],  # noqa: E731
                                  width[~up], size[1])
    if not up.any():
        return down(x)
    out = torch.empty((len(x), x.shape[1], *size), dtype=x.dtype, device=x.device)
    at = (lambda m: torch.as_tensor(np.flatnonzero(m), device=x.device))  # noqa: E731
    out.index_copy_(0, at(up), _bilinear(x.index_select(0, at(up)), top[up], left[up], height[up], width[up], size))
    out.index_copy_(0, at(~up), down(x.index_select(0, at(~up))))
    return out


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
    half = np.array([0.5 * w, 0.5 * h]).reshape(1, 2, 1)
    theta = torch.as_tensor(theta / half, device=x.device).to(x.dtype)  # rows scaled to grid units
    gx = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, dtype=x.dtype, device=x.device).view(1, 1, w)
    gy = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, dtype=x.dtype, device=x.device).view(1, h, 1)
    t = [theta[:, r, k].view(b, 1, 1) for r in range(2) for k in range(3)]
    grid = torch.stack([gx * t[0] + gy * t[1] + t[2], gx * t[3] + gy * t[4] + t[5]], dim=-1)  # [B, H, W, 2]
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


def hue(x: torch.Tensor, shift: np.ndarray) -> torch.Tensor:
    """Rotate each row's hue by ``shift`` turns (in [−0.5, 0.5]) in HSV, as torchvision's ``adjust_hue``:
    hue, saturation and value as torchvision computes them, then back to RGB by the closed form
    channel_n = V − V·S·clamp(min(k, 4 − k), 0, 1), k = (n + 6·hue) mod 6, n = 5, 3, 1 — the same six
    sectors as torchvision's table, in a few whole-tensor operations."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    flat = chroma == 0
    sat = chroma / torch.where(flat, 1.0, maxc)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    # six times the hue, up to a whole turn: in [−1, 5]
    h6 = (is_r * (g - b) + is_g * (b - r) + is_b * (r - g)) / torch.where(flat, 1.0, chroma) + is_g * 2.0 + is_b * 4.0
    offset = torch.as_tensor(np.array([5.0, 3.0, 1.0]) + 6.0 + 6.0 * np.asarray(shift, dtype=np.float64).reshape(-1, 1),
                             device=x.device).to(x.dtype).view(-1, 3, 1, 1)
    k = torch.remainder(h6.unsqueeze(1) + offset, 6.0)
    m = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    out = torch.clamp(maxc.unsqueeze(1) - (maxc * sat).unsqueeze(1) * m, 0.0, 1.0)
    return _keep_where(np.asarray(shift) == 0, x, out)
