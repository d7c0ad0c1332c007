"""Path policy: resolve what a spec names, and keep it inside the data roots."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

from darkstore.errors import CodeNotAllowedError, PathOutsideRootsError, SpecError


def resolve(path: str | Path, *, base_dir: str | Path | None = None, roots: Sequence[str | Path] | None = None) -> Path:
    """Resolve ``path`` (relative to ``base_dir``), following symlinks and ``..``.

    With ``roots`` set, the *resolved* path must lie inside one of them, so neither
    ``../../etc/passwd`` nor a symlink pointing out of a root gets through.
    """
    if "\x00" in str(path):
        raise SpecError(f"path {str(path)[:200]!r} contains a NUL byte")
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    try:
        real = p.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise SpecError(f"path {str(path)[:200]!r} cannot be resolved: {type(exc).__name__}") from exc
    if roots is not None:
        real_roots = [Path(r).expanduser().resolve() for r in roots]
        if not any(real == r or real.is_relative_to(r) for r in real_roots):
            # where it leads (a symlink's target, the roots themselves) stays on the server
            raise PathOutsideRootsError(f"path {str(path)!r} is outside the data roots (after following symlinks "
                                        "and '..')")
    return regular_file(real, "path", shown=path)


def regular_file(path: Path, what: str, shown: str | Path | None = None) -> Path:
    """``path`` must be a regular file: a FIFO, socket or device would hang or flood a reader."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path  # the caller's own "not found" error says it better
    except OSError as exc:
        raise SpecError(f"{what} {str(shown or path)!r} cannot be read: {type(exc).__name__}") from exc
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise SpecError(f"{what} {str(shown or path)!r} is not a regular file (a FIFO, socket or device); refused")
    return path


def import_callable(ref: str, *, allow_code: bool, what: str) -> Callable:
    """Import ``module:function`` — code execution, so only when the operator allows it."""
    if not allow_code:
        raise CodeNotAllowedError(
            f"{what} {ref!r} is a Python factory, which runs arbitrary code; "
            "enable it with --allow-code (CLI) or DARKSTORE_ALLOW_CODE=true (service)"
        )
    if ":" not in ref:
        raise SpecError(f"{what} {ref!r} must look like 'package.module:function'")
    mod_name, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"cannot import {what} {ref!r}: {exc}") from exc
    if not callable(obj):
        raise SpecError(f"{what} {ref!r} is not callable")
    return obj


def children_skip_working_directory() -> None:
    """No Python process darkstore starts imports from the working directory.

    A child started as ``python -c`` (multiprocessing's forkserver) or ``python -m`` (parallel sweeps and
    specialists) puts the working directory first on its import path, so a user's folder named like one of
    darkstore's packages (``storage/`` is a common name) would shadow it. ``PYTHONSAFEPATH`` (Python ≥ 3.11)
    keeps it off; children inherit it. Called by the entry points (the CLI, the API's submit checker)."""
    import os

    os.environ["PYTHONSAFEPATH"] = "1"


def user_cache_dir() -> Path:
    """darkstore's cache folder: ``$DARKSTORE_CACHE``, else ``$XDG_CACHE_HOME/darkstore``, else
    ``~/.cache/darkstore``. Read by entry points (the CLI), which pass what they need down."""
    import os

    if os.environ.get("DARKSTORE_CACHE"):
        return Path(os.environ["DARKSTORE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "darkstore"
