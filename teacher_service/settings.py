"""Service settings: one pydantic-settings class, read from ``DARKSTORE_*`` environment variables.

The API, the Celery workers and the CLI client all read the same class, so one
``.env`` (or the compose file's ``environment:``) configures the whole pipeline.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def engine_base(url: str) -> str:
    """An engine server's address as compared: no trailing slash, no /v1."""
    return url.strip().rstrip("/").removesuffix("/v1")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARKSTORE_", extra="ignore", validate_default=True,
                                      env_ignore_empty=True)  # DARKSTORE_TOKEN= (empty) means no token

    # --- where things live -----------------------------------------------------
    home: Path = Field(Path("darkstore-service"), description="job records (jobs/) and, unless store_root says "
                       "otherwise, stores (stores/<job id>)")
    store_root: str | None = Field(None, description="where job stores are created (<store_root>/<job id>): a "
                                   "directory, file:///… or s3://bucket/prefix; credentials for s3:// come from the "
                                   "AWS environment. Default: <home>/stores")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="every path a request names must resolve inside one of these (os.pathsep- or comma-separated); "
        "relative paths resolve against the first. Empty: the server's working directory.",
    )

    # --- HTTP API --------------------------------------------------------------
    token: SecretStr | None = Field(None, description="bearer token required on every route but /healthz and /readyz")
    max_body_bytes: int = Field(1 << 20, gt=0, description="largest request body accepted (413 above)")
    # --- what one submit may cost (checked before anything is queued) ----------
    submit_timeout: float = Field(300.0, gt=0, description="seconds a submit may spend checking a job (hashing "
                                  "weights, fingerprinting data, loading and probing teachers); 422 above")
    submit_memory_bytes: int = Field(8 << 30, gt=0, description="memory the submit-time check may allocate "
                                     "(address space of its child process)")
    submit_checks: int = Field(2, gt=0, description="submit-time checks that may run at once (each may use "
                               "submit_memory_bytes); a submit beyond them waits up to submit_queue_timeout for a "
                               "slot, then is answered 503 with Retry-After")
    submit_queue_timeout: float = Field(30.0, ge=0, description="seconds a submit waits for a free check slot")
    submit_isolation: bool = Field(True, description="check submits in a child process, so that the time and "
                                   "memory limits are enforced and nothing stays allocated in the API")
    max_teacher_params: int = Field(2_000_000_000, gt=0, description="parameters of all teachers of a job "
                                    "together, counted before any weight is allocated")
    max_input_side: int = Field(4096, gt=0, description="largest image side a job may resize to (data size:, "
                                "member preprocess resize:)")
    api_url: str = Field("http://127.0.0.1:8000", description="where `darkstore submit/jobs` find the API")

    # --- jobs ------------------------------------------------------------------
    broker_url: str | None = Field(None, description="Redis URL; unset: jobs run in-process (serve --local)")
    allow_code: bool = Field(False, description="allow TorchScript/export files and module:function factories")
    device: str = Field("auto", description="auto (cuda when available) | cpu | cuda | cuda:N")
    batch_size: int | None = Field(None, gt=0, description="rows per teacher forward pass (default: 256 rows of "
                                   "classes; token rows of about 8,192 positions)")
    loader_workers: int | None = Field(None, ge=0, description="DataLoader processes decoding inputs inside a task; "
                                       "default: none for arrays files, else up to 8 (half the cores on the CPU)")
    writer_processes: bool | None = Field(None, description="store writes in forked writer processes (True) or "
                                          "threads (False); default: processes on CUDA, threads elsewhere")
    chunks_per_task: int = Field(4, gt=0, description="store chunks per Celery task: the unit of sharding")
    task_time_limit: int = Field(3600, gt=0, description="hard time limit of one chunk-range task, seconds")
    task_soft_time_limit: int | None = Field(None, gt=0, description="default: 90 % of the hard limit")
    visibility_timeout: int = Field(7200, gt=0, description="Redis redelivers an unacknowledged task after this")
    redelivery_check_interval: int = Field(30, gt=0, description="seconds between sweeps for tasks to redeliver")
    max_retries: int = Field(3, ge=0, description="Celery retries of a task after an unexpected error")
    lease_ttl: float = Field(30.0, gt=0, description="a running task's lease: a task whose process stops renewing "
                             "it for this long is presumed dead and its chunks are dispatched again")
    reconcile_interval: float = Field(10.0, gt=0, description="seconds between the API's reconciliation passes; "
                                      "a crashed job resumes within about lease_ttl + reconcile_interval")
    ensemble_cache: int = Field(1, ge=1, description="ensembles a worker process keeps loaded")
    fingerprint_cache: Path | None = Field(None, description="where transfer-set fingerprint manifests are kept "
                                           "(per-file size, mtime, sha256): a set is read whole once, then only "
                                           "listed. Default: <home>/fingerprints")
    verify_data: Literal["quick", "full"] = Field("quick", description="quick: files unchanged since the manifest "
                                                  "keep their digest (a sample is re-read); full: hash every file "
                                                  "at every submit and task")
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="the inference-engine servers (vLLM) that jobs' engine members may call, "
        "comma-separated base URLs (http://vllm:8000); empty: engine members are refused")
    mode: Literal["auto", "local", "celery"] = Field("auto", description="auto: celery when broker_url is set")

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, v):
        if isinstance(v, (str, Path)):
            parts = str(v).replace(",", os.pathsep).split(os.pathsep)
            return [p.strip() for p in parts if p.strip()]
        return v

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, v):
        if isinstance(v, str):
            v = [p for p in v.split(",") if p.strip()]
        return [engine_base(str(p)) for p in v]

    @field_validator("store_root")
    @classmethod
    def _store_root(cls, v):
        if v is None:
            return v
        from storage.location import Location

        return str(Location.parse(v))  # an unknown scheme or a malformed URL fails at start-up, not per job

    @model_validator(mode="after")
    def _limits(self) -> "Settings":
        if self.soft_time_limit >= self.task_time_limit:
            raise ValueError("task_soft_time_limit must be below task_time_limit")
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout} s) must be longer than task_time_limit "
                f"({self.task_time_limit} s), or Redis hands running tasks to a second worker"
            )
        return self

    @property
    def soft_time_limit(self) -> int:
        return self.task_soft_time_limit or max(1, int(self.task_time_limit * 0.9))

    @cached_property
    def roots(self) -> list[Path]:
        return [p.expanduser().resolve() for p in (self.data_roots or [Path.cwd()])]

    @cached_property
    def fingerprints(self):
        """How submits and workers fingerprint transfer sets."""
        from darkstore.fingerprint import FingerprintPolicy

        return FingerprintPolicy(cache_dir=self.fingerprint_cache or self.home / "fingerprints",
                                 verify=self.verify_data)

    @property
    def use_celery(self) -> bool:
        if self.mode == "auto":
            return self.broker_url is not None
        return self.mode == "celery"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def redacted(self) -> dict:
        d = self.model_dump(mode="json")
        d["token"] = "***" if self.token else None
        if self.broker_url and "@" in self.broker_url:  # redis://user:password@host
            scheme, _, rest = self.broker_url.partition("://")
            d["broker_url"] = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return d


__all__ = ["Settings"]
