"""darkstore.kernels, the pixels of recipe version 2: each kernel means what torchvision's functional op
means (against torchvision on float64 inputs), and a row's pixels do not depend on the batch around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode, functional as F

from darkstore import kernels

RNG = np.random.default_rng(0)
X = torch.from_numpy(RNG.random((8, 3, 17, 12), dtype=np.float32))
B = len(X)
FACTORS = RNG.uniform(0.5, 1.5, B)
FACTORS[2] = 1.0  # the identity: the row is left as it is
HUES = RNG.uniform(-0.5, 0.5, B)
HUES[1] = 0.0
TOP, LEFT = RNG.integers(0, 6, B), RNG.integers(0, 4, B)
HEIGHT, WIDTH = RNG.integers(2, 12, B), RNG.integers(2, 9, B)
HEIGHT[0], WIDTH[0], TOP[0], LEFT[0] = 17, 12, 0, 0  # the whole image
ANGLE, TX, TY, SCALE = RNG.uniform(-30, 30, B), RNG.integers(-3, 4, B), RNG.integers(-3, 4, B), RNG.uniform(0.8, 1.2, B)


def per_row(fn):
    return torch.stack([fn(i, X[i].double()) for i in range(B)])


CASES = {
    "resized_crop to 6x6": (lambda x: kernels.resized_crop(x, TOP, LEFT, HEIGHT, WIDTH, (6, 6)),
                            lambda i, x: F.resized_crop(x, int(TOP[i]), int(LEFT[i]), int(HEIGHT[i]), int(WIDTH[i]),
                                                        [6, 6], antialias=True)),
    "resized_crop to 30x25": (lambda x: kernels.resized_crop(x, TOP, LEFT, HEIGHT, WIDTH, (30, 25)),
                              lambda i, x: F.resized_crop(x, int(TOP[i]), int(LEFT[i]), int(HEIGHT[i]), int(WIDTH[i]),
                                                          [30, 25], antialias=True)),
    "resize": (lambda x: kernels.resize(x, (9, 20)), lambda i, x: F.resize(x, [9, 20], antialias=True)),
    "affine": (lambda x: kernels.affine(x, ANGLE, TX, TY, SCALE),
               lambda i, x: F.affine(x, angle=float(ANGLE[i]), translate=[int(TX[i]), int(TY[i])],
                                     scale=float(SCALE[i]), shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR)),
    "hflip": (lambda x: kernels.hflip(x, FACTORS > 1), lambda i, x: F.horizontal_flip(x) if FACTORS[i] > 1 else x),
    "brightness": (lambda x: kernels.brightness(x, FACTORS), lambda i, x: F.adjust_brightness(x, float(FACTORS[i]))),
    "contrast": (lambda x: kernels.contrast(x, FACTORS), lambda i, x: F.adjust_contrast(x, float(FACTORS[i]))),
    "saturation": (lambda x: kernels.saturation(x, FACTORS), lambda i, x: F.adjust_saturation(x, float(FACTORS[i]))),
    "hue": (lambda x: kernels.hue(x, HUES), lambda i, x: F.adjust_hue(x, float(HUES[i]))),
    "grayscale": (kernels.grayscale, lambda i, x: F.rgb_to_grayscale(x)),
}


@pytest.mark.parametrize("name", CASES)
def test_each_kernel_is_torchvisions_op_up_to_float32_rounding(name):
    ours, theirs = CASES[name]
    got, ref = ours(X), per_row(theirs)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # grid_sample's float32 coordinates (affine, upscaling crops); HSV's round trip
    tol = 4e-6 if name == "affine" or name.startswith("resized_crop") else 2e-6 if name == "hue" else 5e-7
    assert (got.double() - ref).abs().max() <= tol


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_a_rows_pixels_do_not_depend_on_its_batch(name, threads):
    """Bit for bit: the batch, the batch reversed, and every row alone."""
    ours, _ = CASES[name]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = ours(X)
        alone = []
        for i in range(B):
            with _only_row(i):
                alone.append(ours(X[i:i + 1]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(whole, torch.cat(alone))


class _only_row:
    """Narrow the module's per-row parameters to row i while a case runs on X[i:i+1]."""

    NAMES = ("FACTORS", "HUES", "TOP", "LEFT", "HEIGHT", "WIDTH", "ANGLE", "TX", "TY", "SCALE")

    def __init__(self, i: int):
        self.i = i

    def __enter__(self):
        self.saved = {n: globals()[n] for n in self.NAMES}
        for n, v in self.saved.items():
            globals()[n] = v[self.i:self.i + 1]

    def __exit__(self, *exc):
        globals().update(self.saved)


def test_resampling_taps_cover_only_the_crop_and_sum_to_one():
    index, w = kernels.resample_taps(np.array([3, 0]), np.array([5, 12]), 7)
    assert index.shape == w.shape and index.shape[:2] == (2, 7)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-15)
    assert (w >= 0).all()
    assert ((index[0] >= 3) & (index[0] < 8)).all() and ((index[1] >= 0) & (index[1] < 12)).all()
    # downscaling 12 -> 7 widens the filter: more than the two taps of plain bilinear
    assert ((w[1] > 0).sum(-1) > 2).any()


def test_identity_factors_leave_rows_untouched_even_outside_0_1():
    x = X[:2].clone()
    x[0] = x[0] * 5 - 2  # a normalised row, outside [0, 1]
    for step, identity in ((kernels.brightness, 1.0), (kernels.contrast, 1.0), (kernels.saturation, 1.0),
                           (kernels.hue, 0.0)):
        out = step(x, np.array([identity, 1.5 if identity else 0.25]))
        assert torch.equal(out[0], x[0])  # not even clamped
        assert not torch.equal(out[1], x[1]) and out[1].min() >= 0 and out[1].max() <= 1


def test_cutmix_box_and_mixup_blend():
    x, xp = X[:2], X[2:4]
    out = kernels.box_paste(x, xp, [1, 0], [2, 0], [4, 0], [6, 0])  # row 1: an empty box
    want = x.clone()
    want[0, :, 1:4, 2:6] = xp[0, :, 1:4, 2:6]
    assert torch.equal(out, want)
    lam = np.array([0.25, 1.0])
    blended = kernels.blend(x, xp, lam)
    assert torch.equal(blended[1], x[1])
    assert torch.allclose(blended[0].double(), 0.25 * x[0].double() + 0.75 * xp[0].double(), atol=1e-7)
