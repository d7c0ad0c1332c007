"""The packages' arrows point one way: kernel (darkstore) <- storage <- the two halves <- the app.
Every import counts, the lazy ones inside functions included."""

from __future__ import annotations

import ast

import pytest

from .conftest import ROOT

PACKAGES = ("darkstore", "storage", "teacher_service", "student_trainer", "darkstore_app")
ALLOWED = {
    "darkstore": set(),
    "storage": {"darkstore"},
    "teacher_service": {"darkstore", "storage"},
    "student_trainer": {"darkstore", "storage"},
    "darkstore_app": {"darkstore", "storage", "teacher_service", "student_trainer"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Our packages each module of ``package`` imports (absolute imports; relative ones stay inside)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = (names & set(PACKAGES)) - {package}
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    bad = {mod: sorted(deps - ALLOWED[package]) for mod, deps in imported_packages(package).items()
           if deps - ALLOWED[package]}
    assert not bad, f"{package} may import only {sorted(ALLOWED[package])}: {bad}"


def test_the_store_rules_live_in_storage():
    """No module outside storage opens zarr itself: every read goes through the reader."""
    for package in ("darkstore", "teacher_service", "student_trainer", "darkstore_app"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(m.split(".")[0] == "zarr" for m in mods), f"{path} imports zarr"
