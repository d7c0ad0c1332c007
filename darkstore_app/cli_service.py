"""`darkstore` commands of the GPU service: `serve`, `worker`, `worker-ping`, `submit`, `jobs`, `cancel`,
`resume`."""


from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from .cli_common import app, _client, _Command, console, _data_root, _job_line, out, _progress, _settings, _state_style



# --- service ---------------------------------------------------------------------


@app.command(cls=_Command)
def serve(
    local: Annotated[bool, typer.Option("--local", help="run jobs in this process (no Redis): the embedded default", metavar="")] = False,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    home: Annotated[Optional[Path], typer.Option(help="job records and stores [env DARKSTORE_HOME]")] = None,
    data_root: Annotated[Optional[list[Path]], typer.Option("--data-root", help="allowed data root (repeatable) [env DARKSTORE_DATA_ROOTS]")] = None,
    broker: Annotated[Optional[str], typer.Option(help="Redis URL [env DARKSTORE_BROKER_URL]")] = None,
    allow_code: Annotated[Optional[bool], typer.Option("--allow-code/--no-allow-code", help="allow code-carrying teachers/data [env DARKSTORE_ALLOW_CODE]", metavar="")] = None,
    device: Annotated[Optional[str], typer.Option(help="device of the local runner [env DARKSTORE_DEVICE]")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
):
    """Serve the HTTP job API (uvicorn). With a broker configured jobs go to Celery workers; without one (or with
    --local) they run in this process."""
    import logging

    import uvicorn

    from teacher_service.api import create_app

    s = _settings(home=home, data_roots=data_root, broker_url=broker, allow_code=allow_code, device=device,
                  mode="local" if local else None)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = "in-process runner" if not s.use_celery else f"Celery via {s.redacted()['broker_url']}"
    console.print(f"darkstore API on http://{host}:{port} — jobs: {engine}; home {s.home.resolve()}; "
                  f"data roots {', '.join(map(str, s.roots))}" + ("; bearer token required" if s.token else ""))
    if not s.token and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning[/]: listening on {host} with no token: anyone who reaches this address can "
                      "submit jobs; set DARKSTORE_TOKEN (docker compose publishes the port on 127.0.0.1 only "
                      "unless DARKSTORE_BIND says otherwise)")
    uvicorn.run(create_app(s), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


@app.command(cls=_Command)
def worker(
    concurrency: Annotated[int, typer.Option(help="worker processes (one per GPU is typical)")] = 1,
    broker: Annotated[Optional[str], typer.Option(help="Redis URL [env DARKSTORE_BROKER_URL]")] = None,
    home: Annotated[Optional[Path], typer.Option(help="shared job records and stores [env DARKSTORE_HOME]")] = None,
    hostname: Annotated[Optional[str], typer.Option(help="Celery node name (default worker@<host>, with a pid suffix)")] = None,
    pool: Annotated[str, typer.Option(help="prefork | solo | threads")] = "prefork",
    log_level: Annotated[str, typer.Option()] = "info",
):
    """Run a Celery worker that takes chunk-range tasks of any job (needs DARKSTORE_BROKER_URL)."""
    import os
    import socket

    for env, value in (("DARKSTORE_BROKER_URL", broker), ("DARKSTORE_HOME", home)):
        if value is not None:
            os.environ[env] = str(value)
    s = _settings()
    if not s.broker_url:
        raise typer.BadParameter("a worker needs a broker: --broker redis://HOST:6379/0 or DARKSTORE_BROKER_URL")
    from teacher_service.celery_app import QUEUE, app as celery

    name = hostname or f"worker-{os.getpid()}@{socket.gethostname()}"
    console.print(f"darkstore worker {name}: {concurrency} process(es), queue {QUEUE!r}, device {s.device}, "
                  f"home {s.home.resolve()}")
    celery.worker_main(["worker", f"--loglevel={log_level.upper()}", f"--concurrency={concurrency}", "-Q", QUEUE,
                        "-n", name, f"--pool={pool}", "--without-gossip", "--without-mingle"])


@app.command("worker-ping", cls=_Command)
def worker_ping(
    timeout: Annotated[float, typer.Option(help="seconds to wait for answers")] = 5.0,
    broker: Annotated[Optional[str], typer.Option(help="Redis URL [env DARKSTORE_BROKER_URL]")] = None,
    any_host: Annotated[bool, typer.Option("--any-host", help="any worker answering will do (default: one on this "
                                           "host, as a container's health check wants)", metavar="")] = False,
):
    """Exit 0 when a worker (on this host) answers a ping through the broker: the worker's health check."""
    import socket

    s = _settings(broker_url=broker)
    if not s.broker_url:
        raise typer.BadParameter("no broker: --broker redis://HOST:6379/0 or DARKSTORE_BROKER_URL")
    from teacher_service.celery_app import make_celery

    celery = make_celery(s)
    host = socket.gethostname()
    try:
        replies = celery.control.ping(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 — the broker is down: unhealthy, said in one line
        console.print(f"[red]unhealthy[/]: cannot reach the broker {s.broker_url} ({type(exc).__name__}: {exc})")
        raise typer.Exit(1)
    names = [name for reply in replies for name in reply]
    mine = names if any_host else [n for n in names if n.endswith("@" + host)]
    if not mine:
        console.print(f"[red]unhealthy[/]: no worker {'' if any_host else f'on {host} '}answered within {timeout:g} s"
                      + (f" (others did: {', '.join(names)})" if names else ""))
        raise typer.Exit(1)
    out.print(", ".join(mine))




def _as_served(path: Path, root: Path) -> str:
    """A path given here (relative to the working directory) as the service resolves it: relative to its data
    root when it lies inside, else absolute (the service then checks it against its roots)."""
    where, root = path.expanduser().resolve(), root.expanduser().resolve()
    return str(where.relative_to(root)) if where.is_relative_to(root) else str(where)




Api = Annotated[Optional[str], typer.Option("--api", help="API base URL [env DARKSTORE_API_URL]")]


Token = Annotated[Optional[str], typer.Option("--token", help="bearer token [env DARKSTORE_TOKEN]")]






@app.command(cls=_Command)
def submit(
    spec: Annotated[Path, typer.Argument(help="job spec file (YAML/JSON); its relative paths are relative to the "
                                         "file that holds them, as for generate")],
    data_root: Annotated[Optional[Path], typer.Option(help="the service's data root as seen from here: paths are "
                                                      "sent relative to it [default: DARKSTORE_DATA_ROOTS's first, "
                                                      "else the job file's folder]")] = None,
    adopt: Annotated[Optional[Path], typer.Option(help="a store `darkstore generate` already made for this job, "
                                                  "inside the data root: verified and taken as the job's store "
                                                  "instead of running the teachers again")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job, with a progress bar", metavar="")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="seconds to wait at most")] = None,
    api: Api = None,
    token: Token = None,
):
    """Submit a teacher job to the service. The same job submitted twice returns the first one."""
    root = _data_root(data_root)
    with _client(api, token) as c:
        sub = c.submit(spec, data_root=root, adopt=_as_served(adopt, root or spec.parent) if adopt else None)
        view, created = sub.job, sub.created
        console.print(("submitted new " if created else "already known: ") + _job_line(view), highlight=False)
        out.print(view.id)
        if wait and view.state in ("queued", "running"):
            with _progress() as progress:
                task = progress.add_task(f"job {view.id[:8]}", total=view.progress.rows_total,
                                         completed=view.progress.rows_done, rate="")

                def show(v):
                    rate = f"{v.rows_per_second:,.0f} rows/s" if v.rows_per_second else v.state
                    progress.update(task, total=v.progress.rows_total, completed=v.progress.rows_done, rate=rate)

                view = c.wait(view.id, timeout=timeout, on_progress=show)
            console.print(_job_line(view), highlight=False)
        if view.state in ("failed", "cancelled"):
            if view.error:
                console.print(f"[red]error:[/] {escape(view.error)}", highlight=False)
            raise typer.Exit(1)
        if wait:
            console.print(f"store: {view.store}")


@app.command(cls=_Command)
def jobs(
    job_id: Annotated[Optional[str], typer.Argument(help="show one job in full")] = None,
    state: Annotated[Optional[str], typer.Option(help="queued | running | succeeded | failed | cancelled")] = None,
    limit: Annotated[int, typer.Option()] = 50,
    offset: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", metavar="")] = False,
    api: Api = None,
    token: Token = None,
):
    """List the service's jobs (newest first), or show one."""
    with _client(api, token) as c:
        if job_id:
            v = c.job(job_id)
            if as_json:
                out.print_json(v.model_dump_json())
                return
            out.print(_job_line(v), highlight=False)
            out.print(f"store {v.store}\ncreated {v.created_at}, started {v.started_at}, finished {v.finished_at}, "
                      f"attempt {v.attempt}" + (f"\nerror: {escape(v.error)}" if v.error else ""), highlight=False)
            return
        page = c.jobs(state, limit, offset)
        items, total = page.items, page.total
        if as_json:
            out.print_json(page.model_dump_json())
            return
        t = Table(title=f"{total} job(s)" + (f" {state}" if state else ""), title_justify="left")
        t.add_column("id", no_wrap=True)
        for col in ("state", "rows", "chunks", "rows/s", "created", "error"):
            t.add_column(col, no_wrap=col != "error")
        for v in items:
            p = v.progress
            t.add_row(v.id, f"[{_state_style(v.state)}]{v.state}[/]", f"{p.rows_done}/{p.rows_total or '?'}",
                      f"{p.chunks_done}/{p.chunks_total or '?'}",
                      f"{v.rows_per_second:,.0f}" if v.rows_per_second else "", v.created_at[:19].replace("T", " "),
                      escape((v.error or "")[:60]))
        out.print(t)


@app.command(cls=_Command)
def cancel(job_id: Annotated[str, typer.Argument()], api: Api = None, token: Token = None):
    """Cancel a job: it stops after the chunk in progress; committed chunks stay."""
    with _client(api, token) as c:
        out.print(_job_line(c.cancel(job_id)), highlight=False)


@app.command(cls=_Command)
def resume(job_id: Annotated[str, typer.Argument()], api: Api = None, token: Token = None):
    """Resume a cancelled or failed job from its committed chunks."""
    with _client(api, token) as c:
        out.print(_job_line(c.resume(job_id)), highlight=False)
