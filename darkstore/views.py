"""Augmentation-aware soft targets: K recorded views per sample.

A recipe (:class:`AugmentSpec`) declares K views and a pipeline of parametrised ops built
on torchvision's transforms v2 functional API. For row ``r`` of a views store — sample
``r // K``, view ``r % K`` — the ops' random parameters are drawn from a generator seeded
by ``(recipe seed, sample, view)``, recorded in the store's ``view_params`` (float64, one
row per store row) and applied to the original input. The teachers' targets in that row
describe exactly that view. At training time :func:`replay` rebuilds each view from the
original input and the *recorded* parameters — the same pixels, bit for bit, on the same
library versions — so teacher and student see the same view.

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

A mix op blends this row's view with the partner sample passed through the *same*
earlier ops (same parameters); the hard-label term then weighs both labels by λ.

A store records the recipe and a *pixel digest*: the recipe applied to a fixed probe.
Replay recomputes the digest; a recipe with an op this code does not know, or an installed
torchvision that makes other pixels, is refused (:class:`ReplayError`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, ClassVar, Literal, Sequence, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from darkstore.errors import DarkstoreError

RECIPE_VERSION = 1
HEAD = ["view", "clean"]  # every row's first two parameters


class ReplayError(DarkstoreError, ValueError):
    """A store's recorded views cannot be rebuilt exactly by the installed code."""


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mixes: ClassVar[bool] = False

    def names(self) -> list[str]:
        raise NotImplementedError

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], num_samples: int) -> list[float]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def apply_batch(self, x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
        """[B, ...] inputs, [B, k] parameters: row by row unless an op has a vectorised form, which must
        give the same pixels bit for bit (tests compare every op with :meth:`apply`)."""
        return torch.stack([self.apply(x[i], p[i]) for i in range(len(x))]) if len(x) else x


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


class HFlip(_Op):
    op: Literal["hflip"]
    p: float = Field(0.5, ge=0, le=1)

    def names(self):
        return ["flip"]

    def draw(self, rng, shape, num_samples):
        return [float(rng.random() < self.p)]

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


class ResizedCrop(_Op):
    op: Literal["resized_crop"]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    size: tuple[int, int] | None = Field(None, description="output [H, W]; default: the input's")

    def names(self):
        return ["top", "left", "height", "width"]

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
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return [float((h - ch) // 2), float((w - cw) // 2), float(ch), float(cw)]

    def apply(self, x, p):
        from torchvision.transforms.v2 import functional as F

        size = list(self.size) if self.size else list(x.shape[-2:])
        return F.resized_crop(x, int(p[0]), int(p[1]), int(p[2]), int(p[3]), size, antialias=True)


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


class Mixup(_Op):
    op: Literal["mixup"]
    alpha: float = Field(0.2, gt=0)
    mixes: ClassVar[bool] = True

    def names(self):
        return ["partner", "lam"]

    def draw(self, rng, shape, num_samples):
        return [float(rng.integers(0, num_samples)), rng.beta(self.alpha, self.alpha)]

    def mix(self, x, xp, p):
        lam = float(p[1])
        return lam * x + (1 - lam) * xp

    def mix_batch(self, x, xp, p):  # λ and 1 − λ rounded to the input's dtype, as the scalar form does
        shape = (-1,) + (1,) * (x.ndim - 1)
        lam = torch.from_numpy(np.ascontiguousarray(p[:, 1])).to(x.dtype).view(shape)
        rest = torch.from_numpy(1 - np.ascontiguousarray(p[:, 1])).to(x.dtype).view(shape)
        return lam * x + rest * xp


class CutMix(_Op):
    op: Literal["cutmix"]
    alpha: float = Field(1.0, gt=0)
    mixes: ClassVar[bool] = True

    def names(self):
        return ["partner", "lam", "y0", "x0", "y1", "x1"]

    def draw(self, rng, shape, num_samples):
        h, w = shape[-2:]
        partner, lam = float(rng.integers(0, num_samples)), rng.beta(self.alpha, self.alpha)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        y0, y1 = max(0, cy - rh // 2), min(h, cy + rh // 2)
        x0, x1 = max(0, cx - rw // 2), min(w, cx + rw // 2)
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
        return [partner, lam, float(y0), float(x0), float(y1), float(x1)]

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


Op = Annotated[Union[Affine, HFlip, ResizedCrop, ColorJitter, Mixup, CutMix], Field(discriminator="op")]


class AugmentSpec(BaseModel):
    """K views per sample made by ``ops``; view 0 is the clean input unless ``clean_view0`` is false."""

    model_config = ConfigDict(extra="forbid")
    views: int = Field(ge=1, le=1000)
    ops: list[Op] = Field(min_length=1)
    clean_view0: bool = True
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "AugmentSpec":
        mixing = [i for i, o in enumerate(self.ops) if o.mixes]
        if len(mixing) > 1 or (mixing and mixing[0] != len(self.ops) - 1):
            raise ValueError("at most one mix op (mixup or cutmix), and it must be the last op")
        return self

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
        out = np.zeros((len(samples), len(self.param_names())), dtype=np.float64)
        for r, (s, v) in enumerate(zip(samples, views)):
            out[r, 0] = v
            if v == 0 and self.clean_view0:
                out[r, 1] = 1
                if self.mix_op:
                    out[r, self.partner_column()] = -1
                continue
            rng = np.random.default_rng([self.seed, int(s), int(v), RECIPE_VERSION])
            out[r, len(HEAD):] = [q for o in self.ops for q in o.draw(rng, shape, num_samples)]
        return out

    # --- applying (generation and replay) ----------------------------------------------
    def output_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for o in self.ops:
            if isinstance(o, ResizedCrop) and o.size:
                shape = (*shape[:-2], *o.size)
        return tuple(shape)

    def apply_one(self, x: torch.Tensor, p: np.ndarray, partner: torch.Tensor | None = None) -> torch.Tensor:
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

    def apply(self, base: Any, samples: np.ndarray, params: np.ndarray) -> torch.Tensor:
        """Inputs of ``samples`` (from ``base.get_batch``) transformed by their rows' ``params``."""
        x, _ = base.get_batch(np.asarray(samples, dtype=np.int64))
        partners = None
        if self.mix_op:
            pc = params[:, self.partner_column()].astype(np.int64)
            if (pc >= 0).any():
                partners = torch.zeros_like(x)
                partners[torch.from_numpy(pc >= 0)] = base.get_batch(pc[pc >= 0])[0].to(x.dtype)
        return self.apply_rows(x, params, partners)

    def apply_rows(self, x: torch.Tensor, params: np.ndarray, partners: torch.Tensor | None = None) -> torch.Tensor:
        """The batch form of :meth:`apply_one` (the same pixels, bit for bit): each op runs once on all
        augmented rows of the batch; a mix op's partners go through the earlier ops with the same rows'
        parameters. ``partners`` [B, ...] are the mix partners' inputs (rows without one: anything)."""
        clean = np.asarray(params[:, 1]) != 0
        size = self.output_size(tuple(x.shape[1:]))
        out = torch.empty((len(x), *size), dtype=x.dtype)
        if clean.any():
            xc = x[torch.from_numpy(clean)]
            if tuple(xc.shape[1:]) != size:
                from torchvision.transforms.v2 import functional as F

                xc = torch.stack([F.resize(r, list(size[-2:]), antialias=True) for r in xc])
            out[torch.from_numpy(clean)] = xc
        aug = ~clean
        if aug.any():
            sel = torch.from_numpy(aug)
            xs, ps = x[sel], params[aug]
            xp = partners[sel] if partners is not None and self.mix_op else None
            for o, s in zip(self.ops, self._slices()):
                if o.mixes:
                    xs = o.mix_batch(xs, xp, ps[:, s])
                else:
                    xs = o.apply_batch(xs, ps[:, s])
                    if xp is not None and self.mix_op:
                        xp = o.apply_batch(xp, ps[:, s])
            out[sel] = xs
        return out

    # --- exact replay ---------------------------------------------------------------
    def pixel_digest(self, shape: tuple[int, ...]) -> str:
        """sha256 of the recipe applied to a fixed probe: equal digests, equal pixels."""
        probe = torch.from_numpy(np.random.default_rng(20150309).random((4, *shape)).astype(np.float32))

        class _Probe:
            def get_batch(self, rows):
                return probe[torch.as_tensor(np.asarray(rows) % 4)], None

        samples = np.repeat(np.arange(4), self.views)
        views = np.tile(np.arange(self.views), 4)
        x = self.apply(_Probe(), samples, self.draw(samples, views, tuple(shape), 4))
        return hashlib.sha256(np.ascontiguousarray(x.numpy()).tobytes()).hexdigest()


def views_record(aug: AugmentSpec, input_shape: Sequence[int]) -> dict[str, Any]:
    """What a store records about its views (``storage.schema.ViewsRecord``)."""
    import torchvision

    return {"version": RECIPE_VERSION, "views": aug.views, "recipe": aug.model_dump(mode="json"),
            "param_names": aug.param_names(), "input_shape": list(input_shape),
            "pixel_digest": aug.pixel_digest(tuple(input_shape)), "torchvision": torchvision.__version__}


def recipe_for_replay(record: Any) -> AugmentSpec:
    """The recipe of a views store (its ``ViewsRecord``), refused unless the installed code rebuilds its
    pixels exactly."""
    import torchvision

    if record.version != RECIPE_VERSION:
        raise ReplayError(f"the store's views use recipe version {record.version}; this darkstore replays "
                          f"version {RECIPE_VERSION}")
    try:
        aug = AugmentSpec.model_validate(record.recipe)
    except ValidationError as exc:
        ops = [o.get("op") for o in record.recipe.get("ops", []) if isinstance(o, dict)]
        raise ReplayError(f"this darkstore cannot replay the store's augmentation recipe (ops {ops}): "
                          f"{exc.errors()[0]['msg']}") from exc
    if aug.param_names() != record.param_names:
        raise ReplayError("the store's view parameters are laid out differently from what this darkstore records")
    digest = aug.pixel_digest(tuple(record.input_shape))
    if digest != record.pixel_digest:
        raise ReplayError(
            f"the installed torchvision {torchvision.__version__} builds other pixels for this recipe than the one "
            f"that generated the store ({record.torchvision}): the stored targets would describe other "
            "images. Install that version, or regenerate the store")
    return aug


class ViewSet:
    """A transfer set seen through a recipe, row by row as the store lays rows out (``layout``: the
    store's ``RowLayout``, which maps a row to a sample position and a view); a position is the sample
    ``order[position]`` with a shuffled row order, else the sample of that number.

    Generation reads inputs through it (``get_batch`` draws and applies the parameters);
    ``params(rows)`` gives what the store records."""

    decodes = True  # every row's view is made on the CPU

    def __init__(self, base: Any, aug: AugmentSpec, layout: Any, order: np.ndarray | None = None):
        if layout.k != aug.views:
            raise ValueError(f"the row layout has {layout.k} views per sample, the recipe {aug.views}")
        self.base, self.aug, self.layout, self.k = base, aug, layout, aug.views
        self.order = None if order is None else np.asarray(order, dtype=np.int64)  # position -> sample
        self.spec, self.class_names = base.spec, base.class_names
        x, _ = base.get_batch(np.arange(1))
        self.input_shape = tuple(x.shape[1:])

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

    def get_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        samples = self.sample_of(rows)
        _, y = self.base.get_batch(samples)
        return self.aug.apply(self.base, samples, self.params(rows)), y


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
