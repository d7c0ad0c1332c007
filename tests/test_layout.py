"""The packages' arrows point one way: kernel (darkstore) <- storage <- the two halves <- interop <- the app.
Every import counts, the lazy ones inside functions included."""

from __future__ import annotations

import ast

import pytest

from .conftest import ROOT

PACKAGES = ("darkstore", "storage", "teacher_service", "student_trainer", "interop", "darkstore_app")
ALLOWED = {
    "darkstore": set(),
    "storage": {"darkstore"},
    "teacher_service": {"darkstore", "storage"},
    "student_trainer": {"darkstore", "storage"},
    "interop": {"darkstore", "storage", "teacher_service", "student_trainer"},
    "darkstore_app": {"darkstore", "storage", "teacher_service", "student_trainer", "interop"},
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


def _modules() -> dict[str, tuple[str, ast.Module]]:
    """Every module of our packages by dotted name, with its path and syntax tree."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = (str(path.relative_to(ROOT)), ast.parse(path.read_text(), filename=str(path)))
    return out


def _targets(modules: dict, name: str, node: ast.AST) -> set[str]:
    """The modules of ours that an import statement in module ``name`` loads (the nearest enclosing module
    of each imported name: ``from storage.forms import Dense`` loads ``storage.forms``)."""
    path = modules[name][0]
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = name.split(".")
            keep = len(parts) - node.level + (1 if path.endswith("__init__.py") else 0)
            base = ".".join(parts[:keep] + ([base] if base else []))
        wanted = [f"{base}.{a.name}" for a in node.names] + [base]
    got = set()
    for w in wanted:
        while w and w not in modules:
            w = w.rpartition(".")[0]
        if w and w != name:
            got.add(w)
    return got


def test_no_import_circles():
    """Module-level imports form no circle (imports under TYPE_CHECKING do not run)."""
    import graphlib

    modules = _modules()
    graph = {}
    for name, (_, tree) in modules.items():
        deps = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _targets(modules, name, node)
        # a package's __init__ naming its own submodules is not a circle: the submodules import siblings
        graph[name] = {d for d in deps if not (d.startswith(name + ".") and modules[name][0].endswith("__init__.py"))}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


#: the modules that import our own modules inside functions, and why; any other such import fails the test
INNER_IMPORTS = {
    # the command line loads what a command needs when it runs: `darkstore --help` and every command's start
    # stay free of torch (bench/startup.py measures it)
    "darkstore_app/cli.py": 1, "darkstore_app/cli_common.py": 4, "darkstore_app/cli_service.py": 3,
    "darkstore_app/cli_store.py": 16, "darkstore_app/cli_interop.py": 4, "darkstore_app/cli_students.py": 24, "darkstore_app/demo.py": 4,
    # torch-free settings and specs (the API's request models, the HTTP client, a sweep's planning) that load
    # the heavy modules of what they name only when asked
    "teacher_service/settings.py": 2, "teacher_service/spec.py": 1, "teacher_service/client.py": 1,
    "student_trainer/sweep.py": 2, "darkstore/modelspec.py": 2, "darkstore/data.py": 2, "darkstore/models.py": 1,
    "darkstore/lm.py": 2,
    # the Celery app and the job runner are started only by the service (a local API runs without Celery)
    "teacher_service/api/__init__.py": 2, "teacher_service/api/routes/ops.py": 1,
    # optional parts loaded on first use: specialists' combination, stacked students, recorded views' replay,
    # the built-in GPT's export to transformers
    "teacher_service/combine.py": 1, "student_trainer/lockstep.py": 1, "student_trainer/loader.py": 2,
    "student_trainer/export.py": 1,
}


def test_project_imports_inside_functions_are_the_listed_ones():
    """Imports go at the top; the modules above keep theirs inside functions for the reason given, and no
    more of them than listed (a new one is hoisted, or listed with its reason)."""
    modules = _modules()
    counts: dict[str, int] = {}
    for name, (path, tree) in modules.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(modules, name, node):
                        counts[path] = counts.get(path, 0) + 1
    over = {p: (n, INNER_IMPORTS.get(p, 0)) for p, n in counts.items() if n > INNER_IMPORTS.get(p, 0)}
    assert not over, f"project imports inside functions beyond the listed ones (found, listed): {over}"


def test_no_importlib_re_exports():
    """Only the `darkstore` namespace loads names on first use (its documented public API); no other module
    reaches our modules through importlib."""
    for name, (path, tree) in _modules().items():
        if name == "darkstore":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and "import_module" in ast.unparse(node.func):
                arg = ast.unparse(node.args[0]) if node.args else ""
                assert not any(arg.strip("'\"").startswith(p) for p in PACKAGES), f"{path}: {ast.unparse(node)}"


def test_form_names_are_spelled_only_in_storage_forms():
    """A form is found through its registry (storage.forms.FORMS, form_of): no module outside storage/forms
    spells a form's name or builds one (the LM kit writes a job as a user would, in YAML words)."""
    import re

    from storage.forms import FORMS

    pattern = re.compile(rf"({'|'.join(FORMS)})([-:@].*)?")
    for name, (path, tree) in _modules().items():
        if name.startswith("storage.forms") or path == "darkstore_app/lmkit.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not pattern.fullmatch(node.value), f"{path}:{node.lineno} spells the form {node.value!r}"
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                head = str(node.values[0].value)
                assert not re.match(rf"({'|'.join(FORMS)})[-:]$", head), f"{path}:{node.lineno} builds a form name"


KIND_PACKAGES = ("storage/kinds/", "teacher_service/kinds/", "student_trainer/kinds/")


def _kind_branches(tree: ast.AST) -> list[tuple[int, str]]:
    """Where a module tells row kinds apart itself: ``meta.sequence`` tested (``is None``, truthiness),
    ``isinstance`` of a text spec or set, a ``modality``, a transfer set's kind compared with ``"text"``."""
    found = []

    def is_sequence(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "sequence"

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and (is_sequence(node.left) or any(map(is_sequence, node.comparators))):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, (ast.If, ast.IfExp, ast.While)) and is_sequence(node.test):
            found.append((node.lineno, ast.unparse(node.test)))
        elif isinstance(node, ast.BoolOp) and any(map(is_sequence, node.values)):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance" and "Text" in ast.unparse(node):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and node.value == "modality":
            found.append((node.lineno, "modality"))
        elif isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "text"
                                                   for c in node.comparators):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_row_kinds_are_told_apart_only_in_their_registries():
    """A row kind (classes, token sequences) is found through its registries (storage.kinds, teacher_service.kinds,
    student_trainer.kinds): no other module asks whether a store holds sequences."""
    bad = [f"{path}:{line}: {what}" for name, (path, tree) in _modules().items()
           if not path.startswith(KIND_PACKAGES) for line, what in _kind_branches(tree)]
    assert not bad, "row-kind branches outside the kinds:\n" + "\n".join(bad)


def test_the_kind_branch_finder_finds_each_way_of_asking():
    src = ("if meta.sequence is None: pass\nx = 1 if r.meta.sequence else 2\nisinstance(spec, TextSpec)\n"
           "s.get('modality')\nspec.data.kind == 'text'\n")
    assert len(_kind_branches(ast.parse(src))) == 5
