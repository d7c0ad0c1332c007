"""How numbers are written in darkstore's tables (sweeps, reports, eval): one place for each unit."""

from __future__ import annotations

import math
from typing import Any


def num(v: Any, fmt: str) -> str:
    """``v`` formatted, or a dash where there is none."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def pct(v: Any) -> str:
    """A fraction as a percentage with two decimals, or a dash."""
    return num(None if v is None else 100 * v, ".2f")
