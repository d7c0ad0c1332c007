"""darkstore.philox: numpy's own Philox4x64-10 stream, vectorised over counters."""

from __future__ import annotations

import numpy as np

from darkstore.philox import philox, uniforms


def test_philox_is_numpys_philox_stream():
    rng = np.random.default_rng(1)
    for _ in range(20):
        key = rng.integers(0, 2 ** 64, size=2, dtype=np.uint64)
        counter = rng.integers(0, 2 ** 64, size=4, dtype=np.uint64)
        counter[0] %= np.uint64(2 ** 63)  # numpy adds one to word 0 before a block: keep clear of its carry
        ref = np.random.Philox(counter=counter, key=key)
        blocks = np.stack([counter + np.array([i + 1, 0, 0, 0], dtype=np.uint64) for i in range(3)])
        got = philox(blocks, (int(key[0]), int(key[1])))
        np.testing.assert_array_equal(got.reshape(-1), ref.random_raw(12))


def test_uniforms_are_numpys_doubles_and_blocks_are_independent_of_their_batch():
    key = (3, 4)
    gen = np.random.Generator(np.random.Philox(counter=np.zeros(4, dtype=np.uint64), key=np.array(key, np.uint64)))
    counters = np.zeros((5, 4), dtype=np.uint64)
    counters[:, 0] = np.arange(1, 6)
    u = uniforms(philox(counters, key)).reshape(-1)
    np.testing.assert_array_equal(u, gen.random(20))
    assert ((0 <= u) & (u < 1)).all()
    # a counter's words do not depend on which other counters share the call
    np.testing.assert_array_equal(philox(counters[3:4], key), philox(counters, key)[3:4])
