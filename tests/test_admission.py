"""Submit-time checks (teacher_service/admission.py): limits enforced in a child process."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from darkstore.errors import SpecError
from teacher_service.admission import Admission, check_spec
from teacher_service.errors import CheckerFailedError, LimitExceededError
from teacher_service.settings import Settings

from .conftest import MEMBERS, job, make_arrays, make_ensemble
from .procs import Api, Proc, free_port, service_env


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


def test_a_checker_that_dies_is_a_memory_limit_only_when_killed(admission):
    """A checker that exits on its own (it could not even import its code) is the server's fault, not the job's
    memory; one that the kernel killed (SIGKILL: the OOM killer) is reported as the memory limit."""
    with pytest.raises(CheckerFailedError, match=r"checker process ended \(exit code 3\)"):
        admission.run(os._exit, 3)
    with pytest.raises(LimitExceededError, match="killed \\(SIGKILL\\).*DARKSTORE_SUBMIT_MEMORY_BYTES"):
        admission.run(signal.raise_signal, signal.SIGKILL)


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

    from teacher_service.prepared import check_param_budget
    from darkstore.models import ModelSpec

    huge = ModelSpec(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [60000, 60000]})  # 3.6e9 params
    tracemalloc.start()
    with pytest.raises(LimitExceededError, match="3,604,"):
        check_param_budget([huge], 5, 1_000_000_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 << 20  # 14 GB of float32 weights were never allocated
    check_param_budget([ModelSpec(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [16]})], 5, 10_000)


def _job_body(**changes) -> dict:
    members = [{"name": f"t{i}", "arch": m["arch"], "arch_kwargs": m["arch_kwargs"],
                "weights": f"teachers/t{i}.safetensors"} for i, m in enumerate(MEMBERS)]
    return {"teachers": {"num_classes": 5, "members": members}, "data": {"kind": "arrays", "path": "transfer.npz"},
            "chunk_rows": 100, **changes}


def _data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_ensemble(root / "teachers", MEMBERS)
    make_arrays(root / "transfer.npz", n=200)
    return root


def test_folders_named_like_darkstores_packages_in_the_working_directory_shadow_nothing(tmp_path):
    """`darkstore serve` (the installed command, as users start it) in a folder holding storage/,
    teacher_service/ and student_trainer/: its submit checker still imports darkstore's own packages."""
    exe = shutil.which("darkstore", path=str(Path(sys.executable).parent))
    assert exe, "the darkstore command is installed beside the test's Python (pip install -e .)"
    work = tmp_path / "work"
    for pkg in ("storage", "teacher_service", "student_trainer"):
        (work / pkg).mkdir(parents=True)
    env = service_env(home=tmp_path / "home", data_roots=_data_root(tmp_path))
    env.pop("PYTHONPATH")  # as a user runs it: darkstore found only where it is installed
    port = free_port()
    api = Proc("api", [exe, "serve", "--local", "--port", str(port)], env, tmp_path / "api.log", cwd=work)
    try:
        api.wait_for_http(f"http://127.0.0.1:{port}/healthz")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=_job_body(), timeout=120)
        assert r.status_code == 201, (r.text, api.text()[-3000:])
    finally:
        api.stop()


def test_submit_checks_beyond_the_bound_wait_then_get_503_with_retry_after(tmp_path):
    """DARKSTORE_SUBMIT_CHECKS=1: while one submit's check runs, another waits its queue time, then is
    answered 503 with Retry-After; once the first is done, the same submit goes through."""
    root = _data_root(tmp_path)
    started = tmp_path / "check-started"
    slow = _job_body(data={"kind": "factory", "factory": "tests.factories:slow_digits",
                           "kwargs": {"delay": 4.0, "started": str(started)}})
    env = service_env(home=tmp_path / "home", data_roots=root, allow_code=True, submit_checks=1,
                      submit_queue_timeout=0.5)
    api = Api(env, tmp_path / "api.log", "--local")
    try:
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(api.url + "/v1/jobs", json=slow, timeout=120)))
        t.start()
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), api.text()[-3000:]
        r = httpx.post(api.url + "/v1/jobs", json=_job_body(), timeout=60)
        assert r.status_code == 503 and r.json()["error"] == "CheckersBusyError", r.text
        assert "DARKSTORE_SUBMIT_CHECKS" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
        t.join(timeout=120)
        assert first["r"].status_code == 201, first["r"].text
        assert httpx.post(api.url + "/v1/jobs", json=_job_body(), timeout=60).status_code == 201
    finally:
        api.stop()
