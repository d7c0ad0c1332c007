"""Real processes for service tests: redis-server on a free loopback port, uvicorn, Celery workers.

Everything binds 127.0.0.1, runs in its own session (so a SIGKILL reaches a worker's
pool children too) and logs to a file that a failing test prints.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import DARKSTORE, ROOT, cli_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_tool(name: str) -> str:
    """A system tool the test needs: a failure on CI (which installs it), a skip elsewhere."""
    exe = shutil.which(name)
    if exe is None:
        msg = f"{name} is not installed (apt-get install -y {name}; ./dev test does it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def need_redis() -> str:
    return need_tool("redis-server")


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT):
        self.name, self.cmd, self.log = name, cmd, log
        self._fh = open(log, "ab")
        self.p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.p.returncode}):\n{self.text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: no {needle!r} in its log after {timeout} s:\n{self.text()[-3000:]}")

    def wait_for_http(self, url: str, timeout: float = 60) -> None:
        """Poll ``url`` until it answers 200 (the process must stay alive meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.p.returncode}):\n{self.text()[-3000:]}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: {url} not answering 200 after {timeout} s:\n{self.text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the worker and its pool children)."""
        if self.alive():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=10)
        self._fh.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class Redis(Proc):
    """redis-server on loopback; ``persist`` keeps an append-only file fsynced on every write, so a
    restart on the same ``port`` and ``tmp`` brings the data back."""

    def __init__(self, tmp: Path, port: int | None = None, persist: bool = False):
        self.port, self.tmp, self.persist = port or free_port(), tmp, persist
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
        super().__init__("redis", [need_redis(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   *durability, "--dir", str(tmp)], dict(os.environ), tmp / "redis.log")
        self.wait_for_log("Ready to accept connections", timeout=20)

    def restart(self) -> "Redis":
        """A new server on the same port and folder (after this one was killed)."""
        return Redis(self.tmp, self.port, self.persist)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class S3Server(Proc):
    """moto's S3-compatible server on loopback (``python -m moto.server``): real HTTP, real signatures.
    ``env`` is what a client process needs: dummy credentials and ``AWS_ENDPOINT_URL``, nothing else
    (the instance-metadata lookup is off, so nothing leaves loopback)."""

    def __init__(self, tmp: Path, port: int | None = None):
        import sys

        self.port = port or free_port()
        super().__init__("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                         dict(os.environ), tmp / "s3.log")
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_for_http(self.url + "/moto-api/")

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "darkstore-test", "AWS_SECRET_ACCESS_KEY": "darkstore-test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url, "AWS_EC2_METADATA_DISABLED": "true"}


def service_env(**settings: object) -> dict[str, str]:
    env = cli_env()
    for k in list(env):
        if k.startswith("DARKSTORE_"):
            del env[k]
    for k, v in settings.items():
        if v is not None:
            env[f"DARKSTORE_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


class Api(Proc):
    def __init__(self, env: dict[str, str], log: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        super().__init__("api", [*DARKSTORE, "serve", "--port", str(self.port), *args], env, log)
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_for_http(self.url + "/healthz")


class Worker(Proc):
    def __init__(self, env: dict[str, str], log: Path, name: str):
        super().__init__(name, [*DARKSTORE, "worker", "--hostname", f"{name}@localhost", "--concurrency", "1"],
                         env, log)
        self.wait_for_log("ready.", timeout=90)


def kill_after_checkpoint(args: list[str], run: Path, env: dict[str, str], grace: float = 0.3,
                          timeout: float = 120) -> None:
    """Start a training command writing to ``run``, SIGKILL it ``grace`` seconds after its first checkpoint."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(grace)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_generation_midway(args: list[str], out: Path, chunks: int = 3) -> None:
    """Start ``darkstore generate ARGS --out OUT``, SIGKILL it once ``chunks`` chunks are committed, and check
    the kill landed mid-job (some chunks committed, not all)."""
    from storage import open_store

    proc = subprocess.Popen([*DARKSTORE, *args, "--out", str(out)], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "done" / "c").exists() and len(list((out / "done" / "c").glob("*"))) >= chunks:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"generation ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = open_store(out, allow_incomplete=True)
    assert 0 < int(partial.done.sum()) < partial.meta.n_chunks, "the kill must land mid-job"


def one_error(done, out, says: str) -> None:
    """A CLI run refused its input: exit 2, one line on stderr starting ``error:`` and saying ``says``, and
    nothing at ``out``."""
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert says in lines[0], lines[0]
    assert not out.exists(), "nothing may be written"
