"""The `darkstore` command line (typer + rich): one app, its commands registered by the modules that own them
(:mod:`.cli_store`: teachers and stores; :mod:`.cli_students`: students; :mod:`.cli_service`: the GPU service),
and :func:`main`, which turns every error into one line and an exit code."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from darkstore.errors import DarkstoreError

# importing them registers their commands, in this order in `darkstore --help`
from . import cli_store  # noqa: F401, I001
from . import cli_students  # noqa: F401
from . import cli_service  # noqa: F401
from . import cli_interop  # noqa: F401
from .cli_common import Interrupted, _error, app, console

__all__ = ["app", "main"]


def main() -> None:
    """Exit codes: 0 done; 1 a job or run ended unsuccessfully (its error is printed); 2 the command could not do
    what was asked (one `error:` line says why); 130 interrupted."""
    import click

    from darkstore.paths import children_skip_working_directory

    children_skip_working_directory()
    usage_errors = tuple({click.UsageError, typer.BadParameter.__base__})  # typer may vendor its own click
    exits, aborts = tuple({click.exceptions.Exit, typer.Exit}), (click.Abort, typer.Abort, KeyboardInterrupt)
    try:
        code = app(standalone_mode=False)
    except Interrupted as exc:
        console.print(f"[yellow]interrupted[/]: {exc}", highlight=False)
        sys.exit(130)
    except DarkstoreError as exc:
        _error(str(exc))
    except ValidationError as exc:
        _error("invalid spec: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
                                           for e in exc.errors()))
    except usage_errors as exc:
        if not exc.format_message():  # no arguments: the help was shown
            sys.exit(2)
        cmd = exc.ctx.command_path if exc.ctx else "darkstore"
        _error(f"{exc.format_message()} (see `{cmd} --help`)")
    except exits as exc:
        sys.exit(exc.exit_code)
    except aborts:
        code = 130
    except OSError as exc:  # a full disk, a permission, a vanished file
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or type(exc).__name__}{where}" if exc.strerror else f"{type(exc).__name__}: {exc}")
    if code == 130:  # Ctrl-C in a command that says nothing more itself (typer returns 130 for it)
        console.print("[yellow]interrupted[/]: what was finished is kept; rerun the same command to continue")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
