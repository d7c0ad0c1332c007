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
