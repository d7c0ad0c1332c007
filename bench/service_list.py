"""Job listing and /metrics cost against the number of jobs: two real API processes (`darkstore serve
--local`), one whose home holds 1 job and one whose home holds N jobs (default 1,000; each a real record
with its own real store), queried alternately by 20 concurrent clients. Prints the latency of each and the
median of the paired ratios (N jobs / 1 job) with its spread.

    ./dev bench service_list [--jobs 1000] [--rounds 15] [--requests 200]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from _common import ROOT, machine, teachers  # noqa: E402  (sets sys.path)

from teacher_service.generate import generate  # noqa: E402
from teacher_service.jobs import JobBook, JobRecord, _now  # noqa: E402
from teacher_service.spec import JobSpec  # noqa: E402


def make_home(home: Path, store: Path, n: int) -> None:
    """``n`` succeeded jobs, each with a copy of ``store`` and a record as the service writes it."""
    book = JobBook(home)
    from storage import open_store

    meta = open_store(store).meta
    for i in range(n):
        job_id = secrets.token_hex(12)
        dst = book.store_path(job_id)
        shutil.copytree(store, dst)
        now = _now()
        rec = JobRecord(id=job_id, job_key=job_id * 2 + "0" * 16, state="succeeded", spec={"note": f"bench job {i}"},
                        store=str(dst), created_at=now, updated_at=now, started_at=now, finished_at=now,
                        num_rows=meta.num_rows, chunk_rows=meta.chunk_rows)
        book.put(rec.with_mask(np.ones(meta.n_chunks, dtype=bool)))


def serve(home: Path, data_root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "darkstore_app.cli", "serve", "--local", "--port", str(port), "--home",
                          str(home), "--data-root", str(data_root), "--log-level", "warning"],
                         stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return p, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"API did not start: {log.read_text()[-2000:]}")


def burst(pool: ThreadPoolExecutor, clients: list[httpx.Client], url: str, path: str, n: int) -> list[float]:
    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = clients[i % len(clients)].get(url + path)
        r.raise_for_status()
        return time.perf_counter() - t0

    return list(pool.map(one, range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--requests", type=int, default=200, help="requests per round and variant")
    ap.add_argument("--concurrency", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="darkstore-bench-list-"))
    procs = []
    try:
        root = tmp / "data"
        root.mkdir()
        rng = np.random.default_rng(0)
        np.savez(root / "x.npz", x=rng.random((64, 16), dtype=np.float32), y=rng.integers(0, 5, 64))
        members = teachers(root / "teachers", 1, 5, "mlp", in_features=16, hidden=[8])
        spec = JobSpec.model_validate({"teachers": {"members": members, "num_classes": 5},
                                       "data": {"kind": "arrays", "path": str(root / "x.npz")}, "chunk_rows": 16})
        generate(spec, tmp / "store")
        # 1 job (what the issue compares with), a full page's worth (the same page, fewer jobs), N jobs
        homes = {1: tmp / "one", 50: tmp / "page", args.jobs: tmp / "many"}
        for n, home in homes.items():
            make_home(home, tmp / "store", n)
        urls = {}
        for n, home in homes.items():
            p, urls[n] = serve(home, root, tmp / f"api-{n}.log")
            procs.append(p)
        pool = ThreadPoolExecutor(args.concurrency)
        clients = [httpx.Client(timeout=60) for _ in range(args.concurrency)]
        print(f"machine: {machine()}")
        print(f"{args.concurrency} concurrent clients, {args.requests} requests per round and variant, "
              f"{args.rounds} rounds, variants alternated")
        for path in ("/v1/jobs", "/metrics"):
            for n in homes:  # warm-up: the index is built on the first listing
                burst(pool, clients, urls[n], path, args.concurrency)
            lat = {n: [] for n in homes}
            ratios = {1: [], 50: []}
            for r in range(args.rounds):
                order = list(homes) if r % 2 == 0 else list(homes)[::-1]
                medians = {}
                for n in order:
                    t = burst(pool, clients, urls[n], path, args.requests)
                    lat[n] += t
                    medians[n] = statistics.median(t)
                for base in ratios:
                    ratios[base].append(medians[args.jobs] / medians[base])
            for n in homes:
                q = np.quantile(lat[n], [0.5, 0.99]) * 1000
                page = min(n, 50)
                print(f"GET {path:9s} {n:5d} job(s) (page {page:2d}): p50 {q[0]:7.2f} ms  p99 {q[1]:7.2f} ms")
            for base, rs in ratios.items():
                qs = np.quantile(rs, [0.0, 0.25, 0.5, 0.75, 1.0])
                print(f"GET {path:9s} ratio {args.jobs} jobs / {base} job(s) (median of {len(rs)} paired round "
                      f"medians): {qs[2]:.2f}  (IQR {qs[1]:.2f}–{qs[3]:.2f}, range {qs[0]:.2f}–{qs[4]:.2f})")
        for c in clients:
            c.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
