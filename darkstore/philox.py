"""Philox4x64-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), vectorised
over counters in numpy: random numbers that are a pure function of (key, counter), so a batch of rows
draws all its parameters in a few array operations instead of seeding a generator per row.

The output is numpy's own ``np.random.Philox`` stream: ``philox(counters, key)`` equals the first four
``random_raw()`` words of ``np.random.Philox(counter=c - 1, key=key)`` (numpy increments the counter before
each block; tests compare the two), and :func:`uniforms` turns words into doubles the way numpy's
``Generator.random`` does.
"""

from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)
_LO32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 64-bit words of the 128-bit products a·b (b an array), from 32-bit halves."""
    al, ah = a & _LO32, a >> _32
    bl, bh = b & _LO32, b >> _32
    ll, lh, hl, hh = al * bl, al * bh, ah * bl, ah * bh
    mid = (ll >> _32) + (lh & _LO32) + (hl & _LO32)
    hi = hh + (lh >> _32) + (hl >> _32) + (mid >> _32)
    return hi, a * b


def philox(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """[..., 4] uint64 counters -> [..., 4] uint64 random words under the 128-bit ``key``."""
    c = np.asarray(counters, dtype=np.uint64)
    c0, c1, c2, c3 = (c[..., i].copy() for i in range(4))
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFFFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        for r in range(10):
            if r:
                k0, k1 = k0 + _W0, k1 + _W1
            hi0, lo0 = _mulhilo(_M0, c0)
            hi1, lo1 = _mulhilo(_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=-1)


def uniforms(words: np.ndarray) -> np.ndarray:
    """Doubles in [0, 1) from 64-bit words: the top 53 bits, as numpy's ``Generator.random``."""
    return (np.asarray(words, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
