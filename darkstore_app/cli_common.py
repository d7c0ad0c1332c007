"""What every `darkstore` command shares: the typer app, the consoles, progress bars, options and small
formatting helpers. The commands live in :mod:`.cli_store`, :mod:`.cli_students` and :mod:`.cli_service`;
:mod:`.cli` puts them together."""


from __future__ import annotations

import functools
import inspect
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from darkstore.errors import DarkstoreError, SpecError


class _FlagHelp:
    """Help options are flags: no value, so no type in the help (typer would print `<bool>`)."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="darkstore",
    help="Run a teacher ensemble once over a transfer set; distill many students from the cached soft targets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def settings_options(model: Any, skip: Sequence[str] = (), **changed: dict[str, Any]) -> Callable:
    """A command whose options are ``model``'s fields (a pydantic settings model), one to one: each option's
    name, type (choices for a Literal; a flag for a bool), default and help are its field's, so a setting is
    declared once, in its model. ``skip``: fields the command builds otherwise; ``changed``: per field, what the
    command line does differently (``names``, ``annotation``, ``default``, ``help``). The command takes them as
    keyword arguments (``**settings``), after its own options."""
    def option(name: str, field: Any) -> inspect.Parameter:
        c = changed.get(name, {})
        annotation = c.get("annotation", field.annotation)
        names = c.get("names", ("--" + name.replace("_", "-"),) if annotation is bool else ())
        flag = {"metavar": ""} if annotation is bool else {}
        opt = typer.Option(*names, help=c.get("help", field.description), **flag)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=c.get("default", field.default),
                                 annotation=Annotated[annotation, opt])

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)  # typer reads a given signature as it is
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        generated = [option(n, f) for n, f in model.model_fields.items() if n not in skip]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=[*own, *generated])
        return command
    return wrap


def given_settings(ctx: typer.Context, model: Any) -> dict[str, Any]:
    """The options of ``model``'s fields given on the command line (not left at their defaults)."""
    def given(name: str) -> bool:  # typer may vendor its own click: compare the source by name
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {name: ctx.params[name] for name in model.model_fields if name in ctx.params and given(name)}


console = Console(stderr=True, soft_wrap=True)  # messages stay one greppable line


out = Console(width=None if sys.stdout.isatty() else 160)  # tables stay whole in logs and pipes


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal and not _force_progress(),
    )


def _task(progress: Progress, task_id):
    return next(t for t in progress.tasks if t.id == task_id)


def _force_progress() -> bool:
    import os

    return os.environ.get("DARKSTORE_PROGRESS", "") == "1"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class Verify(str, Enum):
    quick = "quick"
    full = "full"


Track = Annotated[Optional[list[str]], typer.Option(
    "--track", help="also send each run's metrics to: tensorboard (event files in RUN/tensorboard; repeatable)")]


VerifyData = Annotated[Verify, typer.Option(
    "--verify-data", help="quick: the transfer set is read whole once, then checked against its fingerprint "
    "manifest (files' size and mtime, a sample re-read) kept in $DARKSTORE_CACHE (default ~/.cache/darkstore); "
    "full: hash every file again")]


def _cache() -> Path:
    """The CLI's cache folder ($DARKSTORE_CACHE, else ~/.cache/darkstore): fingerprint manifests, teacher costs."""
    from darkstore.paths import user_cache_dir

    return user_cache_dir()


def _fingerprints(verify: Verify | str, progress: Progress | None = None):
    """How this command fingerprints transfer sets: through the user's manifest cache, with a progress bar
    while a large set is read whole."""
    from darkstore.fingerprint import FingerprintPolicy

    task: dict = {}

    def on_bytes(done: int, total: int) -> None:
        if progress is None or total < (64 << 20):  # small sets hash in a blink
            return
        if "id" not in task:
            task["id"] = progress.add_task("fingerprinting the transfer set", total=total, rate="")
        progress.update(task["id"], completed=done, rate=f"{_human(done)} of {_human(total)}")

    return FingerprintPolicy(cache_dir=_cache() / "fingerprints", verify=Verify(verify).value,
                             progress=on_bytes)


def _error(message: str, code: int = 2) -> None:
    """One line on stderr, whatever the message holds (newlines folded), then exit."""
    console.print("[red]error:[/]", escape(" ".join(message.split())), highlight=False)
    sys.exit(code)


def _json_option(value: str | None, option: str) -> dict:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{option} is not valid JSON ({exc.msg} at character {exc.pos}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise SpecError(f"{option} must be a JSON object, got {value!r}")
    return parsed


# --- many students: sweep, eval, export, report -------------------------------------
def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


class Interrupted(DarkstoreError):
    """Ctrl-C: the message says what was kept and the command that continues."""


def _again(add: str | None = None, drop: tuple[str, ...] = ()) -> str:
    """The command line this process was started with, to run again (``add`` a flag, ``drop`` some)."""
    import shlex

    args = [a for a in sys.argv[1:] if a not in drop]
    return shlex.join(["darkstore", *args, *([add] if add and add not in args else [])])


def _data_root(given: Optional[Path]) -> Optional[Path]:
    """Where the service's first data root is, as seen from here: given, else DARKSTORE_DATA_ROOTS's first."""
    if given is not None:
        return given
    roots = _settings().data_roots
    return roots[0] if roots else None


def _client(api: Optional[str], token: Optional[str]):
    from teacher_service.client import DarkstoreClient

    return DarkstoreClient(api, token)


def _state_style(state: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}.get(state, "white")


def _job_line(v) -> str:
    p = v.progress
    rate = f", {v.rows_per_second:,.0f} rows/s" if v.rows_per_second else ""
    eta = f", ETA {v.eta_seconds:.0f} s" if v.eta_seconds is not None else ""
    total = p.rows_total if p.rows_total is not None else "?"
    return (f"job {v.id} [{_state_style(v.state)}]{v.state}[/]: {p.rows_done}/{total} rows, "
            f"{p.chunks_done}/{p.chunks_total or '?'} chunks{rate}{eta}")


def _settings(**overrides):
    from teacher_service.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None and v != []})
