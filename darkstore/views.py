"""Augmentation-aware soft targets: K recorded views per sample.

A recipe (:class:`AugmentSpec`) declares K views and a pipeline of parametrised ops. For row ``r`` of a
views store — sample ``r // K``, view ``r % K`` — the ops' random parameters are a pure function of
``(recipe seed, sample, view)``, recorded in the store's ``view_params`` (float64, one row per store row)
and applied to the original input. The teachers' targets in that row describe exactly that view. At
training time :meth:`AugmentSpec.apply` rebuilds each view from the original input and the *recorded*
parameters, so teacher and student see the same view.

Ops (in the order given; ``mixup``/``cutmix`` may close the pipeline):

========================  =====================================  ==========================
op                        options                                recorded per row
========================  =====================================  ==========================
``affine``                degrees, translate (fraction), scale   angle, tx, ty (pixels), scale
``hflip``                 p                                      flip
``resized_crop``          scale, ratio, size                     top, left, height, width
``color_jitter``          brightness, contrast, saturation, hue  the four factors
``mixup``                 alpha (Beta(α, α))                     partner sample, λ
``cutmix``                alpha                                  partner, λ (box area), box
========================  =====================================  ==========================

A mix op blends this row's view with the partner sample passed through the *same* earlier ops (same
parameters); the hard-label term then weighs both labels by λ.

Two recipe versions, recorded in the store:

- **2** (new stores): parameters drawn for a whole batch at once from Philox keyed by (seed, version)
  with counter (block, op, view, sample) (:mod:`darkstore.philox`); pixels made by the batched kernels of
  :mod:`darkstore.kernels` on the device that runs the teachers, each sample decoded once for its K views.
  Bit-identical on the same device type and library; elsewhere within a stated tolerance (below).
- **1** (stores made before): a numpy generator seeded per row, torchvision's functional ops row by row
  (``affine``, ``hflip`` and the mix ops batched, bit for bit). Replayed and resumed as they were made.

A store records the recipe and a *pixel digest* (sha256 of the recipe applied to a fixed probe, on the
device that made the views). Version 2 also records a 64-value CountSketch of the probe's pixels and their
RMS. Replay recomputes the probe: equal digests mean equal pixels; otherwise (another device type) a
version-2 store is replayed when the sketch puts the pixels' RMS difference within :data:`TOLERANCE` of
their RMS — rounding, not a different image — and refused otherwise, as is a recipe with an op this code
does not know (:class:`ReplayError`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar, Literal, Sequence, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from darkstore import kernels
from darkstore.errors import DarkstoreError, SpecError
from darkstore.philox import philox, uniforms

log = logging.getLogger(__name__)

RECIPE_VERSION = 2  # what new stores get
VERSIONS = (1, 2)  # what this darkstore replays and resumes
HEAD = ["view", "clean"]  # every row's first two parameters
TOLERANCE = 1e-4  # version 2 across device types: RMS pixel difference / RMS pixel, at most
SKETCH_SIZE = 64
CPU_BLOCK_BYTES = 1 << 20  # version 2 on a CPU: rows (with their partners) made a block of about this size at a time


class ReplayError(DarkstoreError, ValueError):
    """A store's recorded views cannot be rebuilt by the installed code."""


def _beta_quantile(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(α, α) by inversion of its CDF: one uniform per draw, so a batch draws in one call."""
    from scipy.special import betaincinv

    return np.asarray(betaincinv(alpha, alpha, u), dtype=np.float64)


def _floor_int(u: np.ndarray, n: Any) -> np.ndarray:
    """Integers uniform in 0 … n − 1 from uniforms in [0, 1) (n may vary per row)."""
    return np.minimum(np.floor(u * n), np.asarray(n) - 1)


def _uniform(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mixes: ClassVar[bool] = False
    uniforms: ClassVar[int] = 4  # version 2: uniforms each row draws for this op

    def names(self) -> list[str]:
        raise NotImplementedError

    # version 1: a generator per row, torchvision row by row
    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> list[float]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def apply_batch(self, x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
        """[B, ...] inputs, [B, k] parameters: row by row unless an op has a vectorised form, which must
        give the same pixels bit for bit (tests compare every op with :meth:`apply`)."""
        return torch.stack([self.apply(x[i], p[i]) for i in range(len(x))]) if len(x) else x

    # version 2: a batch at once
    def draw_rows(self, u: np.ndarray, shape: tuple[int, ...], num_samples: int) -> np.ndarray:
        """[B, uniforms] uniforms in [0, 1) -> [B, k] parameters."""
        raise NotImplementedError

    def kernel(self, x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
        """[B, C, H, W] on any device, [B, k] parameters: :mod:`darkstore.kernels`."""
        raise NotImplementedError


def _inverse_affine():
    """torchvision's own inverse-matrix helper for affine (private: None where a release lacks it,
    and affine then runs row by row)."""
    try:
        from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix
    except ImportError:
        return None
    return _get_inverse_affine_matrix


class Affine(_Op):
    op: Literal["affine"]
    degrees: float = Field(0.0, ge=0, le=180)
    translate: float = Field(0.0, ge=0, le=1, description="max shift as a fraction of width/height: the shift is "
                             "round(u·translate·W), u uniform in [−1, 1], so whole-pixel shifts are not equally likely "
                             "(translate·W = 2: 0 and ±1 each 25 %, ±2 each 12.5 %); see shift")
    shift: int | None = Field(None, ge=0, le=4096, description="max shift in whole pixels, each of −shift..shift "
                              "equally likely (instead of translate)")
    scale: tuple[float, float] = (1.0, 1.0)

    @model_validator(mode="after")
    def _one_shift(self) -> "Affine":
        if self.shift is not None and self.translate:
            raise ValueError("give translate (a fraction) or shift (whole pixels), not both")
        return self

    def names(self):
        return ["angle", "tx", "ty", "scale"]

    def draw(self, rng, shape, num_samples):
        h, w = shape[-2:]
        if self.shift is not None:
            return [rng.uniform(-self.degrees, self.degrees), float(rng.integers(-self.shift, self.shift + 1)),
                    float(rng.integers(-self.shift, self.shift + 1)), rng.uniform(*self.scale)]
        return [rng.uniform(-self.degrees, self.degrees), float(round(rng.uniform(-1, 1) * self.translate * w)),
                float(round(rng.uniform(-1, 1) * self.translate * h)), rng.uniform(*self.scale)]

    def draw_rows(self, u, shape, num_samples):
        h, w = shape[-2:]
        if self.shift is not None:
            tx, ty = (_floor_int(u[:, i], 2 * self.shift + 1) - self.shift for i in (1, 2))
        else:
            tx, ty = (np.round(_uniform(u[:, i], -1.0, 1.0) * self.translate * n) for i, n in ((1, w), (2, h)))
        return np.stack([_uniform(u[:, 0], -self.degrees, self.degrees), tx, ty,
                         _uniform(u[:, 3], *self.scale)], axis=1)

    def apply(self, x, p):
        from torchvision.transforms.v2 import InterpolationMode, functional as F

        return F.affine(x, angle=float(p[0]), translate=[int(p[1]), int(p[2])], scale=float(p[3]), shear=[0.0, 0.0],
                        interpolation=InterpolationMode.BILINEAR)

    def apply_batch(self, x, p):
        """One sampling grid per row and one ``grid_sample`` call for the batch: torchvision's affine
        kernel (inverse matrix, grid, bilinear sampling with zero fill) with a per-row matrix."""
        inverse = _inverse_affine()
        if not len(x) or x.ndim != 4 or not torch.is_floating_point(x) or inverse is None:
            return super().apply_batch(x, p)
        b, _, h, w = x.shape
        theta = torch.tensor([inverse([0.0, 0.0], float(r[0]), [float(int(r[1])), float(int(r[2]))],
                                              float(r[3]), [0.0, 0.0]) for r in p], dtype=x.dtype).reshape(b, 2, 3)
        base = torch.empty(1, h, w, 3, dtype=x.dtype)
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w))
        base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h).unsqueeze_(-1))
        base[..., 2].fill_(1)
        scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype))
        grid = torch.matmul(base.view(1, h * w, 3), scaled).view(b, h, w, 2)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def kernel(self, x, p):
        return kernels.affine(x, p[:, 0], p[:, 1], p[:, 2], p[:, 3])


class HFlip(_Op):
    op: Literal["hflip"]
    p: float = Field(0.5, ge=0, le=1)
    uniforms: ClassVar[int] = 1

    def names(self):
        return ["flip"]

    def draw(self, rng, shape, num_samples):
        return [float(rng.random() < self.p)]

    def draw_rows(self, u, shape, num_samples):
        return (u[:, :1] < self.p).astype(np.float64)

    def apply(self, x, p):
        from torchvision.transforms.v2 import functional as F

        return F.horizontal_flip(x) if p[0] else x

    def apply_batch(self, x, p):
        flip = torch.from_numpy(np.asarray(p[:, 0]) != 0)
        if not flip.any():
            return x
        out = x.clone()
        out[flip] = x[flip].flip(-1)
        return out

    def kernel(self, x, p):
        return kernels.hflip(x, p[:, 0])


class ResizedCrop(_Op):
    op: Literal["resized_crop"]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    size: tuple[int, int] | None = Field(None, description="output [H, W]; default: the input's")
    attempts: ClassVar[int] = 10
    uniforms: ClassVar[int] = 4 * 10  # scale, ratio, top, left per attempt

    def names(self):
        return ["top", "left", "height", "width"]

    def _fallback(self, h: int, w: int) -> list[float]:
        """torchvision's centre crop when no attempt fits."""
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return [float((h - ch) // 2), float((w - cw) // 2), float(ch), float(cw)]

    def draw(self, rng, shape, num_samples):  # torchvision's RandomResizedCrop.get_params, on our generator
        h, w = shape[-2:]
        area = h * w
        lr = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ar = math.exp(rng.uniform(*lr))
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                return [float(rng.integers(0, h - ch + 1)), float(rng.integers(0, w - cw + 1)), float(ch), float(cw)]
        return self._fallback(h, w)

    def draw_rows(self, u, shape, num_samples):
        """torchvision's get_params, every attempt of every row at once; a row takes its first attempt that
        fits."""
        h, w = shape[-2:]
        u = u.reshape(len(u), self.attempts, 4)
        target = h * w * _uniform(u[..., 0], *self.scale)
        ar = np.exp(_uniform(u[..., 1], math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw, ch = np.round(np.sqrt(target * ar)), np.round(np.sqrt(target / ar))
        fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        top, left = _floor_int(u[..., 2], h - ch + 1), _floor_int(u[..., 3], w - cw + 1)
        first = fits.argmax(axis=1)
        pick = (lambda a: a[np.arange(len(a)), first])  # noqa: E731
        out = np.stack([pick(top), pick(left), pick(ch), pick(cw)], axis=1)
        out[~fits.any(axis=1)] = self._fallback(h, w)
        return out

    def apply(self, x, p):
        from torchvision.transforms.v2 import functional as F

        size = list(self.size) if self.size else list(x.shape[-2:])
        return F.resized_crop(x, int(p[0]), int(p[1]), int(p[2]), int(p[3]), size, antialias=True)

    def kernel(self, x, p):
        return kernels.resized_crop(x, p[:, 0], p[:, 1], p[:, 2], p[:, 3], tuple(self.size or x.shape[-2:]))


class ColorJitter(_Op):
    op: Literal["color_jitter"]
    brightness: float = Field(0.0, ge=0)
    contrast: float = Field(0.0, ge=0)
    saturation: float = Field(0.0, ge=0)
    hue: float = Field(0.0, ge=0, le=0.5)

    def names(self):
        return ["brightness", "contrast", "saturation", "hue"]

    def draw(self, rng, shape, num_samples):
        f = (lambda a: rng.uniform(max(0.0, 1 - a), 1 + a) if a else 1.0)  # noqa: E731
        return [f(self.brightness), f(self.contrast), f(self.saturation),
                rng.uniform(-self.hue, self.hue) if self.hue else 0.0]

    def draw_rows(self, u, shape, num_samples):
        f = (lambda a, c: _uniform(u[:, c], max(0.0, 1 - a), 1 + a) if a else np.ones(len(u)))  # noqa: E731
        hue = _uniform(u[:, 3], -self.hue, self.hue) if self.hue else np.zeros(len(u))
        return np.stack([f(self.brightness, 0), f(self.contrast, 1), f(self.saturation, 2), hue], axis=1)

    def apply(self, x, p):
        from torchvision.transforms.v2 import functional as F

        if p[0] != 1:
            x = F.adjust_brightness(x, float(p[0]))
        if p[1] != 1:
            x = F.adjust_contrast(x, float(p[1]))
        if p[2] != 1:
            x = F.adjust_saturation(x, float(p[2]))
        if p[3] != 0:
            x = F.adjust_hue(x, float(p[3]))
        return x

    def kernel(self, x, p):
        """Brightness, contrast, saturation, hue, in that order; a row whose factor is the identity is left
        as it is by that step."""
        for step, col, identity in ((kernels.brightness, 0, 1.0), (kernels.contrast, 1, 1.0),
                                    (kernels.saturation, 2, 1.0), (kernels.hue, 3, 0.0)):
            if (p[:, col] != identity).any():
                x = step(x, p[:, col])
        return x


class Mixup(_Op):
    op: Literal["mixup"]
    alpha: float = Field(0.2, gt=0)
    mixes: ClassVar[bool] = True
    uniforms: ClassVar[int] = 2

    def names(self):
        return ["partner", "lam"]

    def draw(self, rng, shape, num_samples):
        return [float(rng.integers(0, num_samples)), rng.beta(self.alpha, self.alpha)]

    def draw_rows(self, u, shape, num_samples):
        return np.stack([_floor_int(u[:, 0], num_samples), _beta_quantile(self.alpha, u[:, 1])], axis=1)

    def mix(self, x, xp, p):
        lam = float(p[1])
        return lam * x + (1 - lam) * xp

    def mix_batch(self, x, xp, p):  # λ and 1 − λ rounded to the input's dtype, as the scalar form does
        shape = (-1,) + (1,) * (x.ndim - 1)
        lam = torch.from_numpy(np.ascontiguousarray(p[:, 1])).to(x.dtype).view(shape)
        rest = torch.from_numpy(1 - np.ascontiguousarray(p[:, 1])).to(x.dtype).view(shape)
        return lam * x + rest * xp

    def mix_kernel(self, x, xp, p):
        return kernels.blend(x, xp, p[:, 1])


class CutMix(_Op):
    op: Literal["cutmix"]
    alpha: float = Field(1.0, gt=0)
    mixes: ClassVar[bool] = True

    def names(self):
        return ["partner", "lam", "y0", "x0", "y1", "x1"]

    @staticmethod
    def _box(h: int, w: int, lam: Any, cy: Any, cx: Any) -> tuple[Any, ...]:
        """The box of area about (1 − λ)·H·W centred at (cy, cx), clipped to the image, and the area kept."""
        rh, rw = np.floor(h * np.sqrt(1 - lam)).astype(np.int64), np.floor(w * np.sqrt(1 - lam)).astype(np.int64)
        y0, y1 = np.maximum(0, cy - rh // 2), np.minimum(h, cy + rh // 2)
        x0, x1 = np.maximum(0, cx - rw // 2), np.minimum(w, cx + rw // 2)
        return 1 - (y1 - y0) * (x1 - x0) / (h * w), y0, x0, y1, x1

    def draw(self, rng, shape, num_samples):
        h, w = shape[-2:]
        partner, lam = float(rng.integers(0, num_samples)), rng.beta(self.alpha, self.alpha)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        y0, y1 = max(0, cy - rh // 2), min(h, cy + rh // 2)
        x0, x1 = max(0, cx - rw // 2), min(w, cx + rw // 2)
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
        return [partner, lam, float(y0), float(x0), float(y1), float(x1)]

    def draw_rows(self, u, shape, num_samples):
        h, w = shape[-2:]
        cy, cx = _floor_int(u[:, 2], h).astype(np.int64), _floor_int(u[:, 3], w).astype(np.int64)
        lam, y0, x0, y1, x1 = self._box(h, w, _beta_quantile(self.alpha, u[:, 1]), cy, cx)
        return np.stack([_floor_int(u[:, 0], num_samples), lam, y0, x0, y1, x1], axis=1).astype(np.float64)

    def mix(self, x, xp, p):
        y0, x0, y1, x1 = (int(v) for v in p[2:6])
        out = x.clone()
        out[..., y0:y1, x0:x1] = xp[..., y0:y1, x0:x1]
        return out

    def mix_batch(self, x, xp, p):
        out = x.clone()
        for i, (y0, x0, y1, x1) in enumerate(np.asarray(p[:, 2:6], dtype=np.int64).tolist()):
            out[i, ..., y0:y1, x0:x1] = xp[i, ..., y0:y1, x0:x1]
        return out

    def mix_kernel(self, x, xp, p):
        return kernels.box_paste(x, xp, p[:, 2], p[:, 3], p[:, 4], p[:, 5])


Op = Annotated[Union[Affine, HFlip, ResizedCrop, ColorJitter, Mixup, CutMix], Field(discriminator="op")]


@dataclass
class ViewInputs:
    """What a batch of views is made from, before the ops run: each sample (and mix partner) the batch
    needs, decoded once, and for every row where its sample and its partner sit in ``x`` and its
    parameters. Crosses a DataLoader (``pin_memory``) and moves to the device (``to``) as one object;
    :meth:`AugmentSpec.make` turns it into the views there."""

    x: torch.Tensor  # [U, ...]
    at: np.ndarray  # [B] row -> its sample in x
    partner_at: np.ndarray | None  # [B] row -> its partner in x, −1 without one
    params: np.ndarray  # [B, P]
    y: torch.Tensor | None = None  # [B] the rows' samples' labels, where the base set gave them

    def pin_memory(self) -> "ViewInputs":
        return replace(self, x=self.x.pin_memory())

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "ViewInputs":
        return replace(self, x=self.x.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class Probe:
    """The recipe applied to a fixed probe: the digest of its pixels, a CountSketch of them, their RMS."""

    digest: str
    sketch: np.ndarray
    rms: float
    size: int

    def rms_difference(self, sketch: Sequence[float]) -> float:
        """An estimate of the RMS pixel difference between this probe and one with ``sketch`` (the squared
        distance of two CountSketches is an unbiased estimate of the squared distance of their inputs)."""
        d = self.sketch - np.asarray(sketch, dtype=np.float64)
        return float(np.sqrt(np.dot(d, d) / self.size))


def _count_sketch(pixels: np.ndarray) -> np.ndarray:
    """[SKETCH_SIZE]: each pixel added with a random sign to a random bucket, both fixed per position
    (16-bit fields of Philox words under a fixed key)."""
    n = len(pixels)
    blocks = -(-n // 16)
    counters = np.zeros((blocks, 4), dtype=np.uint64)
    counters[:, 0] = np.arange(blocks, dtype=np.uint64)
    words = philox(counters, (0x5EED5CE7C4, 0)).reshape(-1, 1)
    fields = ((words >> np.array([0, 16, 32, 48], dtype=np.uint64)) & np.uint64(0xFFFF)).reshape(-1)[:n]
    sign = np.where(fields & np.uint64(SKETCH_SIZE), 1.0, -1.0)
    return np.bincount((fields % np.uint64(SKETCH_SIZE)).astype(np.int64), weights=sign * pixels,
                       minlength=SKETCH_SIZE)


def _block_rows(n: int, row_bytes: int, device: torch.device) -> int:
    """How many of ``n`` rows version 2 makes at a time: on a CPU about :data:`CPU_BLOCK_BYTES` of pixels
    (at least one row), elsewhere all of them. A kernel's row does not depend on the rows beside it, so the
    pixels are the same whatever the block; a block's dozens of intermediate tensors stay in the cache and
    in memory the allocator reuses, where a whole batch's are fresh pages at every step
    (``./dev bench views_generate``: a 224×224 views job about 1.4× faster made in blocks)."""
    return max(1, n) if device.type != "cpu" else max(1, min(n, CPU_BLOCK_BYTES // max(1, row_bytes)))


class AugmentSpec(BaseModel):
    """K views per sample made by ``ops``; view 0 is the clean input unless ``clean_view0`` is false.

    The recipe version (how parameters are drawn and pixels made) is not part of the recipe: new views
    use :data:`RECIPE_VERSION`, a store's are replayed with the version it records (:meth:`at_version`)."""

    model_config = ConfigDict(extra="forbid")
    views: int = Field(ge=1, le=1000)
    ops: list[Op] = Field(min_length=1)
    clean_view0: bool = True
    seed: int = Field(0, ge=0)
    _version: int = PrivateAttr(RECIPE_VERSION)

    @model_validator(mode="after")
    def _check(self) -> "AugmentSpec":
        mixing = [i for i, o in enumerate(self.ops) if o.mixes]
        if len(mixing) > 1 or (mixing and mixing[0] != len(self.ops) - 1):
            raise ValueError("at most one mix op (mixup or cutmix), and it must be the last op")
        return self

    @property
    def version(self) -> int:
        return self._version

    def at_version(self, version: int) -> "AugmentSpec":
        """This recipe, drawing and making pixels as recipe version ``version`` does."""
        if version not in VERSIONS:
            raise ReplayError(f"the store's views use recipe version {version}; this darkstore replays versions "
                              f"{', '.join(map(str, VERSIONS))}")
        out = self.model_copy()
        out._version = version
        return out

    # --- layout of a row's parameters ---------------------------------------------------
    def param_names(self) -> list[str]:
        return HEAD + [f"{o.op}{i}.{n}" for i, o in enumerate(self.ops) for n in o.names()]

    def _slices(self) -> list[slice]:
        out, at = [], len(HEAD)
        for o in self.ops:
            out.append(slice(at, at + len(o.names())))
            at += len(o.names())
        return out

    @property
    def mix_op(self) -> Mixup | CutMix | None:
        return self.ops[-1] if self.ops[-1].mixes else None  # type: ignore[return-value]

    def partner_column(self) -> int | None:
        return self._slices()[-1].start if self.mix_op else None

    # --- drawing (generation) ---------------------------------------------------------
    def draw(self, samples: np.ndarray, views: np.ndarray, shape: tuple[int, ...], num_samples: int) -> np.ndarray:
        """[B, P] float64 parameters of (sample, view) pairs: a pure function of (seed, sample, view)."""
        samples, views = np.asarray(samples, dtype=np.int64), np.asarray(views, dtype=np.int64)
        out = np.zeros((len(samples), len(self.param_names())), dtype=np.float64)
        out[:, 0] = views
        clean = (views == 0) & self.clean_view0
        out[clean, 1] = 1
        if self.mix_op:
            out[clean, self.partner_column()] = -1
        aug = np.flatnonzero(~clean)
        if self._version == 1:
            for r in aug:
                rng = np.random.default_rng([self.seed, int(samples[r]), int(views[r]), 1])
                out[r, len(HEAD):] = [q for o in self.ops for q in o.draw(rng, shape, num_samples)]
            return out
        for i, (o, s) in enumerate(zip(self.ops, self._slices())):
            blocks = -(-o.uniforms // 4)
            counters = np.zeros((len(aug), blocks, 4), dtype=np.uint64)
            counters[..., 0] = np.arange(blocks, dtype=np.uint64)
            counters[..., 1] = i
            counters[..., 2] = views[aug, None].astype(np.uint64)
            counters[..., 3] = samples[aug, None].astype(np.uint64)
            u = uniforms(philox(counters, (self.seed, self._version))).reshape(len(aug), -1)[:, :o.uniforms]
            out[aug, s] = o.draw_rows(u, shape, num_samples)
        return out

    # --- applying (generation and replay) ----------------------------------------------
    def output_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for o in self.ops:
            if isinstance(o, ResizedCrop) and o.size:
                shape = (*shape[:-2], *o.size)
        return tuple(shape)

    def apply_one(self, x: torch.Tensor, p: np.ndarray, partner: torch.Tensor | None = None) -> torch.Tensor:
        """Version 1's definition: one row through torchvision's functional ops."""
        if p[1]:  # the clean view (resized when the recipe fixes the output size)
            size = self.output_size(tuple(x.shape))
            if tuple(x.shape) != size:
                from torchvision.transforms.v2 import functional as F

                x = F.resize(x, list(size[-2:]), antialias=True)
            return x
        sl = self._slices()
        for o, s in zip(self.ops, sl):
            if o.mixes:
                xp = partner
                for o2, s2 in zip(self.ops[:-1], sl[:-1]):
                    xp = o2.apply(xp, p[s2])
                x = o.mix(x, xp, p[s])
            else:
                x = o.apply(x, p[s])
        return x

    def inputs(self, base: Any, samples: np.ndarray, params: np.ndarray) -> ViewInputs:
        """What the views of ``samples`` (with their rows' ``params``) are made from: every sample and mix
        partner they need, read once through ``base.get_batch``."""
        samples = np.asarray(samples, dtype=np.int64)
        partners = None
        if self.mix_op:
            partners = params[:, self.partner_column()].astype(np.int64)
        wanted = samples if partners is None else np.concatenate([samples, partners[partners >= 0]])
        unique, where = np.unique(wanted, return_inverse=True)
        x, y = base.get_batch(unique)
        at = where[:len(samples)]
        partner_at = None
        if partners is not None:
            partner_at = np.full(len(samples), -1, dtype=np.int64)
            partner_at[partners >= 0] = where[len(samples):]
        return ViewInputs(x, at, partner_at, params, None if y is None else y[torch.from_numpy(at)])

    def make(self, inp: ViewInputs) -> torch.Tensor:
        """The views ``inp`` describes, made on the device ``inp.x`` is on."""
        if self._version == 1:
            partners = None
            if inp.partner_at is not None:
                partners = inp.x[torch.from_numpy(np.maximum(inp.partner_at, 0))]
            return self._apply_rows_v1(inp.x[torch.from_numpy(inp.at)], inp.params, partners)
        dev = inp.x.device
        clean = np.asarray(inp.params[:, 1]) != 0
        size = self.output_size(tuple(inp.x.shape[1:]))
        idx = (lambda a: torch.as_tensor(np.ascontiguousarray(a), device=dev))  # noqa: E731

        def clean_views(r: np.ndarray) -> torch.Tensor:
            xc = inp.x.index_select(0, idx(inp.at[r]))
            return xc if tuple(xc.shape[1:]) == size else self._resize(xc, size)

        def views(r: np.ndarray) -> torch.Tensor:
            pick = inp.at[r] if self.mix_op is None else np.concatenate([inp.at[r], inp.partner_at[r]])
            return self._run(inp.x.index_select(0, idx(pick)), inp.params[r])

        row_bytes = max(math.prod(inp.x.shape[1:]), math.prod(size)) * inp.x.element_size()
        blocks = []
        for fn, rows, nbytes in ((clean_views, np.flatnonzero(clean), row_bytes),
                                 (views, np.flatnonzero(~clean), row_bytes * (2 if self.mix_op else 1))):
            step = _block_rows(len(rows), nbytes, dev)
            blocks += [(fn, rows[i:i + step]) for i in range(0, len(rows), step)]
        if len(blocks) == 1:
            return blocks[0][0](blocks[0][1])
        out = torch.empty((len(clean), *size), dtype=inp.x.dtype, device=dev)
        for fn, rows in blocks:  # each block's views go straight to their rows, while they are in the cache
            out.index_copy_(0, idx(rows), fn(rows))
        return out

    def apply(self, base: Any, samples: np.ndarray, params: np.ndarray) -> torch.Tensor:
        """Inputs of ``samples`` (from ``base.get_batch``) transformed by their rows' ``params``."""
        return self.make(self.inputs(base, samples, params))

    def _apply_rows_v1(self, x: torch.Tensor, params: np.ndarray, partners: torch.Tensor | None) -> torch.Tensor:
        """Version 1: each op runs once on all augmented rows of the batch (bit for bit :meth:`apply_one`); a
        mix op's partners go through the earlier ops with the same rows' parameters."""
        clean = np.asarray(params[:, 1]) != 0
        size = self.output_size(tuple(x.shape[1:]))
        out = torch.empty((len(x), *size), dtype=x.dtype, device=x.device)
        if clean.any():
            sel = torch.as_tensor(clean, device=x.device)
            xc = x[sel]
            if tuple(xc.shape[1:]) != size:
                xc = self._resize(xc, size)
            out[sel] = xc
        aug = ~clean
        if aug.any():
            sel = torch.as_tensor(aug, device=x.device)
            xp = partners[sel] if partners is not None and self.mix_op else None
            out[sel] = self._run_v1(x[sel], params[aug], xp)
        return out

    def _resize(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        if self._version == 1:
            from torchvision.transforms.v2 import functional as F

            return torch.stack([F.resize(r, list(size[-2:]), antialias=True) for r in x])
        return kernels.resize(x, tuple(size[-2:]))

    def _run_v1(self, xs: torch.Tensor, ps: np.ndarray, xp: torch.Tensor | None) -> torch.Tensor:
        for o, s in zip(self.ops, self._slices()):
            if o.mixes:
                xs = o.mix_batch(xs, xp, ps[:, s])
            else:
                xs = o.apply_batch(xs, ps[:, s])
                if xp is not None:
                    xp = o.apply_batch(xp, ps[:, s])
        return xs

    def _run(self, both: torch.Tensor, ps: np.ndarray) -> torch.Tensor:
        """Version 2: ``both`` holds the augmented rows, then (with a mix op) their partners; all of them go
        through each op's kernel together (rows are independent in every kernel), then the mix."""
        if both.ndim != 4 or not torch.is_floating_point(both):
            raise ValueError(f"views need float image inputs [C, H, W]; the transfer set gives "
                             f"{tuple(both.shape[1:])} {both.dtype}")
        n = len(ps)
        pb = ps if self.mix_op is None else np.concatenate([ps, ps])
        for o, s in zip(self.ops, self._slices()):
            if o.mixes:
                return o.mix_kernel(both[:n], both[n:], ps[:, s])
            both = o.kernel(both, pb[:, s])
        return both

    # --- checking replay ----------------------------------------------------------------
    def probe(self, shape: tuple[int, ...], device: str | torch.device = "cpu") -> Probe:
        """The recipe applied on ``device`` to a fixed probe of 4 samples of ``shape``, all K views each."""
        x = torch.from_numpy(np.random.default_rng(20150309).random((4, *shape)).astype(np.float32))

        class _Probe:
            def get_batch(self, rows):
                return x[torch.as_tensor(np.asarray(rows) % 4)], None

        samples = np.repeat(np.arange(4), self.views)
        views = np.tile(np.arange(self.views), 4)
        inp = self.inputs(_Probe(), samples, self.draw(samples, views, tuple(shape), 4))
        pixels = np.ascontiguousarray(self.make(inp.to(device)).cpu().numpy())
        flat = pixels.reshape(-1).astype(np.float64)
        return Probe(hashlib.sha256(pixels.tobytes()).hexdigest(), _count_sketch(flat),
                     float(np.sqrt(np.mean(flat * flat))), len(flat))


def _torchvision_version() -> str | None:
    """Without importing it (a second and a half): version 2 makes its pixels without torchvision."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchvision")
    except PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def views_record(aug: AugmentSpec, input_shape: Sequence[int], device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a store records about its views (``storage.schema.ViewsRecord``), probed on ``device``, where
    the views are made."""
    device = torch.device(device)
    probe = aug.probe(tuple(input_shape), device)
    record = {"version": aug.version, "views": aug.views, "recipe": aug.model_dump(mode="json"),
              "param_names": aug.param_names(), "input_shape": list(input_shape),
              "pixel_digest": probe.digest, "torchvision": _torchvision_version()}
    if aug.version >= 2:
        record.update(pixel_sketch=probe.sketch.tolist(), pixel_rms=probe.rms, device=_device_name(device),
                      torch=torch.__version__)
    return record


def recipe_for_replay(record: Any, device: str | torch.device = "cpu") -> AugmentSpec:
    """The recipe of a views store (its ``ViewsRecord``), at the store's recipe version, refused unless the
    installed code rebuilds its pixels on ``device``: bit for bit, or for version 2 within :data:`TOLERANCE`."""
    if record.version not in VERSIONS:
        raise ReplayError(f"the store's views use recipe version {record.version}; this darkstore replays "
                          f"versions {', '.join(map(str, VERSIONS))}")
    try:
        aug = AugmentSpec.model_validate(record.recipe).at_version(record.version)
    except ValidationError as exc:
        ops = [o.get("op") for o in record.recipe.get("ops", []) if isinstance(o, dict)]
        raise ReplayError(f"this darkstore cannot replay the store's augmentation recipe (ops {ops}): "
                          f"{exc.errors()[0]['msg']}") from exc
    if aug.param_names() != record.param_names:
        raise ReplayError("the store's view parameters are laid out differently from what this darkstore records")
    probe = aug.probe(tuple(record.input_shape), device)
    if probe.digest == record.pixel_digest:
        return aug
    if record.version == 1:
        raise ReplayError(
            f"the installed torchvision {_torchvision_version()} builds other pixels for this recipe than the one "
            f"that generated the store ({record.torchvision}): the stored targets would describe other "
            "images. Install that version, or regenerate the store")
    rel = probe.rms_difference(record.pixel_sketch) / max(record.pixel_rms, 1e-12)
    if rel > TOLERANCE:
        raise ReplayError(
            f"this machine (torch {torch.__version__}, {torch.device(device).type}) rebuilds the store's views "
            f"differently from the "
            f"{record.device} that made them (torch {record.torch}): the probe's pixels differ by about {rel:.2g} "
            f"of their RMS, more than the {TOLERANCE:g} that rounding explains, so the stored targets would "
            "describe other images. Replay with that torch version, or regenerate the store")
    log.info("replaying views made on %s within rounding: the probe's pixels differ by about %.2g of their RMS "
             "(tolerance %g)", record.device, rel, TOLERANCE)
    return aug


class ViewSet:
    """A transfer set seen through a recipe, row by row as the store lays rows out (``layout``: the
    store's ``RowLayout``, which maps a row to a sample position and a view); a position is the sample
    ``order[position]`` with a shuffled row order, else the sample of that number.

    Generation reads inputs through it: ``get_inputs`` gives what a batch's views are made from (version 2:
    made on the teachers' device with :meth:`AugmentSpec.make`), ``get_batch`` the views themselves;
    ``params(rows)`` gives what the store records."""

    def __init__(self, base: Any, aug: AugmentSpec, layout: Any, order: np.ndarray | None = None):
        if layout.k != aug.views:
            raise ValueError(f"the row layout has {layout.k} views per sample, the recipe {aug.views}")
        self.base, self.aug, self.layout, self.k = base, aug, layout, aug.views
        self.order = None if order is None else np.asarray(order, dtype=np.int64)  # position -> sample
        self.spec, self.class_names = base.spec, base.class_names
        x, _ = base.get_batch(np.arange(1))
        self.input_shape = tuple(x.shape[1:])
        if aug.version >= 2 and len(self.input_shape) != 3:
            raise SpecError(f"views need image inputs [C, H, W]; the transfer set gives samples of shape "
                            f"{list(self.input_shape)}")

    @property
    def device_views(self) -> bool:
        """Whether a batch's views are made by the consumer, on its device (version 2)."""
        return self.aug.version >= 2

    @property
    def decodes(self) -> bool:
        """Version 2 makes the views on the device: loading is the base set's; version 1 makes them here."""
        return getattr(self.base, "decodes", True) if self.device_views else True

    def __len__(self) -> int:
        return len(self.base) * self.k

    @property
    def fingerprint(self) -> str:
        return self.base.fingerprint

    def sample_of(self, rows: np.ndarray) -> np.ndarray:
        positions = self.layout.position(rows)
        return positions if self.order is None else self.order[positions]

    def params(self, rows: np.ndarray) -> np.ndarray:
        """Drawn per (seed, sample, view): a sample gets the same views whatever the store's row order."""
        return self.aug.draw(self.sample_of(rows), self.layout.view(rows), self.input_shape, len(self.base))

    def get_inputs(self, rows: np.ndarray) -> tuple[ViewInputs, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        samples = self.sample_of(rows)
        inp = self.aug.inputs(self.base, samples, self.params(rows))
        return inp, inp.y

    def get_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inp, y = self.get_inputs(rows)
        return self.aug.make(inp), y


def select_views(rows: np.ndarray, layout: Any, per_sample: int | None, seed: int, epoch: int) -> np.ndarray:
    """The rows one epoch uses: all of them, or ``per_sample`` random views of each sample
    among its rows in ``rows`` (seeded by seed and epoch; sorted). ``layout``: the store's ``RowLayout``."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if per_sample is None or per_sample >= layout.k:
        return rows
    samples = layout.position(rows)
    keys = np.random.default_rng([seed, epoch, 17]).random(len(rows))
    order = np.lexsort((keys, samples))
    s_sorted = samples[order]
    start = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    rank = np.arange(len(rows)) - np.repeat(start, np.diff(np.r_[start, len(rows)]))
    return np.sort(rows[order][rank < per_sample])
