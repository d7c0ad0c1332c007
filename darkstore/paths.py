"""Path policy: resolve what a spec names, and keep it inside the data roots."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

from storage.errors import CodeNotAllowedError, PathOutsideRootsError, SpecError


def resolve(path: str | Path, *, base_dir: str | Path | None = None, roots: Sequence[str | Path] | None = None) -> Path:
    """Resolve ``path`` (relative to ``base_dir``), following symlinks and ``..``.

    With ``roots`` set, the *resolved* path must lie inside one of them, so neither
    ``../../etc/passwd`` nor a symlink pointing out of a root gets through.
    """
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    real = p.resolve()
    if roots is not None:
        real_roots = [Path(r).expanduser().resolve() for r in roots]
        if not any(real == r or real.is_relative_to(r) for r in real_roots):
            shown = ", ".join(str(r) for r in real_roots) or "(none configured)"
            raise PathOutsideRootsError(f"path {str(path)!r} resolves to {real}, outside the data roots: {shown}")
    return real


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
