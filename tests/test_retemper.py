"""Combine rules and re-temperature: exact where DESIGN.md says, flagged where not.

Member logits go through the real generation code into a float32 store; the
targets the trainer derives are compared with float64 references.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage import open_store
from student_trainer.retemper import plan
from teacher_service.generate import generate

from .conftest import job, reference_member_logits

TS = [0.5, 1.0, 2.0, 4.0, 10.0]


def softmax64(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def geometric_ref(z, T):
    """Renormalised geometric mean of the members' tempered distributions."""
    logp = np.log(softmax64(z / T)).mean(0)
    return softmax64(logp)


def arithmetic_ref(z, T):
    return softmax64(z / T).mean(0)


def targets(store, T, **kw):
    r = open_store(store)
    rt = plan(r.meta, T, **kw)
    c = r.read_all(members=rt.needs_members)
    mem = None if c.members is None else torch.from_numpy(c.members.transpose(1, 0, 2).copy())
    return rt, torch.exp(rt(torch.from_numpy(c.logits), mem).double()).numpy()


@pytest.fixture
def z(ensemble, arrays):
    return reference_member_logits(ensemble, arrays)


def test_geometric_retemperature_is_exact_at_every_T(tmp_path, ensemble, arrays, z):
    generate(job(ensemble, arrays, combine="geometric", dtype="float32", chunk_rows=64), tmp_path / "g")
    for T in TS:
        rt, p = targets(tmp_path / "g", T)
        assert rt.exact and rt.mode == "geometric"
        np.testing.assert_allclose(p, geometric_ref(z, T), atol=2e-6, rtol=1e-4)


def test_arithmetic_exact_at_generation_T_only_approximate_elsewhere(tmp_path, ensemble, arrays, z):
    generate(job(ensemble, arrays, combine="arithmetic", temperature=2.0, dtype="float32", chunk_rows=64), tmp_path / "a")
    rt, p = targets(tmp_path / "a", 2.0)
    assert rt.exact and rt.mode == "arithmetic@T_gen"
    np.testing.assert_allclose(p, arithmetic_ref(z, 2.0), atol=2e-6, rtol=1e-4)
    for T in (1.0, 4.0):
        rt, p = targets(tmp_path / "a", T)
        assert not rt.exact and "APPROXIMATE" in rt.describe()
        # it really is not the arithmetic mean at T: the flag is not decoration
        assert np.abs(p - arithmetic_ref(z, T)).max() > 1e-3


def test_arithmetic_with_members_is_exact_at_every_T(tmp_path, ensemble, arrays, z):
    generate(job(ensemble, arrays, combine="arithmetic", temperature=2.0, dtype="float32", keep_members=True,
                 chunk_rows=64), tmp_path / "m")
    for T in TS:
        rt, p = targets(tmp_path / "m", T)
        assert rt.exact
        np.testing.assert_allclose(p, arithmetic_ref(z, T), atol=2e-6, rtol=1e-4)
    rt, _ = targets(tmp_path / "m", 4.0, use_members=False)
    assert not rt.exact


def test_float16_store_targets_close_to_float32(tmp_path, ensemble, arrays, z):
    generate(job(ensemble, arrays, combine="geometric", dtype="float16", chunk_rows=64), tmp_path / "h")
    for T in (1.0, 4.0):
        _, p = targets(tmp_path / "h", T)
        ref = geometric_ref(z, T)
        kl = (ref * (np.log(ref + 1e-300) - np.log(p + 1e-300))).sum(-1)
        assert kl.max() < 1e-4, kl.max()
