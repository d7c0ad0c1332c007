"""Read YAML or JSON spec files with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from darkstore.errors import DataNotFoundError, SpecError


def load_spec_file(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"spec file not found: {path}") from exc
    except OSError as exc:
        raise DataNotFoundError(f"cannot read spec file {path}: {exc}") from exc
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc


def apply_overrides(doc: dict[str, Any], sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``doc`` with each ``KEY=VALUE`` of ``sets`` applied in order: ``KEY`` a dotted path into nested mappings
    (``student.arch_kwargs.n_layer=4``; missing mappings are made), ``VALUE`` read as YAML (``0.5``, ``true``,
    ``[0, 1]``, ``{n: 2}``, or a plain string). ``doc`` itself is not changed."""
    import copy

    out = copy.deepcopy(doc)
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"--set {item!r}: give KEY=VALUE (KEY may be dotted: student.arch_kwargs.n_layer=4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {item!r}: the value is not valid YAML: {exc}") from exc
        *path, last = key.strip().split(".")
        node = out
        for part in path:
            if not isinstance(node.setdefault(part, {}), dict):
                raise SpecError(f"--set {item!r}: {part} is {node[part]!r}, not a mapping")
            node = node[part]
        node[last] = value
    return out
