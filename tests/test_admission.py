"""Submit-time checks (teacher_service/admission.py): limits enforced in a child process."""

from __future__ import annotations

import time

import pytest

from darkstore.errors import SpecError
from teacher_service.errors import LimitExceededError
from teacher_service.admission import Admission, check_spec
from teacher_service.settings import Settings

from .conftest import job


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def _allocate(nbytes: int) -> int:
    return len(bytearray(nbytes))


def _boom() -> None:
    import zipfile

    raise zipfile.BadZipFile("File is not a zip file")


@pytest.fixture(scope="module")
def admission(tmp_path_factory):
    s = Settings(home=tmp_path_factory.mktemp("home"), submit_timeout=3, submit_memory_bytes=512 << 20)
    return Admission(s)


def test_the_check_runs_in_a_child_and_returns(admission):
    assert admission.isolated
    assert admission.run(_sleep, 0.01) == "woke"
    assert admission.run(_allocate, 64 << 20) == 64 << 20  # under the memory limit


def test_a_check_over_the_time_limit_is_killed(admission):
    t0 = time.monotonic()
    with pytest.raises(LimitExceededError, match="longer than 3 s"):
        admission.run(_sleep, 60)
    assert time.monotonic() - t0 < 10


def test_a_check_over_the_memory_limit_is_refused(admission):
    with pytest.raises(LimitExceededError, match="memory"):
        admission.run(_allocate, 4 << 30)


def test_unexpected_errors_become_spec_errors(admission):
    with pytest.raises(SpecError, match="BadZipFile: File is not a zip file"):
        admission.run(_boom)


def test_static_limits(ensemble, arrays):
    s = Settings(max_input_side=64)
    spec = job(ensemble, arrays)
    check_spec(spec, s)
    doc = spec.model_dump()
    doc["teachers"]["members"][0]["preprocess"] = {"resize": 65}
    big = type(spec).model_validate(doc)
    with pytest.raises(LimitExceededError, match="resize 65 is outside 1..64"):
        check_spec(big, s)


def test_parameter_budget_is_counted_without_allocating(ensemble, arrays):
    import tracemalloc

    from teacher_service.generate import check_param_budget
    from darkstore.models import ModelSpec

    huge = ModelSpec(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [60000, 60000]})  # 3.6e9 params
    tracemalloc.start()
    with pytest.raises(LimitExceededError, match="3,604,"):
        check_param_budget([huge], 5, 1_000_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 << 20  # 14 GB of float32 weights were never allocated
    check_param_budget([ModelSpec(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [16]})], 5, 10_000)
