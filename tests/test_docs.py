"""The documentation: the site builds with warnings as errors, its generated references cover the code, the README
stays an entry page whose quick start runs as written, and the code passes ruff."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, cli_env

README = ROOT / "README.md"


def docs_env() -> dict[str, str]:
    # mkdocs-material and a plugin print notices about MkDocs 2 on every build; they are not about this site
    return {**cli_env(), "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


@pytest.mark.slow
def test_the_site_builds_strictly_with_references_generated_from_the_code(tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                       env=docs_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    import typer

    from darkstore_app.cli import app
    from storage.fields import FIELDS
    from teacher_service.settings import Settings

    cli = (site / "reference" / "cli" / "index.html").read_text()
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():  # every command and every option of it
        assert f'id="{name}"' in cli, name
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    assert opt in cli, (name, opt)
    fields = (site / "reference" / "store-fields" / "index.html").read_text()
    assert all(f"<code>{f.name}</code>" in fields for f in FIELDS)
    settings = (site / "reference" / "settings" / "index.html").read_text()
    assert all(f"DARKSTORE_{n.upper()}" in settings for n in Settings.model_fields)
    rest = (site / "reference" / "rest" / "index.html").read_text()
    assert "/v1/jobs" in rest and "adopt" in rest and "Retry-After" in rest
    python = (site / "reference" / "python" / "index.html").read_text()
    assert "SoftTargets" in python and "train_many" in python


def test_the_readme_is_an_entry_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for page in re.findall(r"\]\((docs/[^)#]+)", text):  # its links into the docs lead somewhere
        assert (ROOT / page).exists(), page


def quickstart() -> str:
    text = README.read_text()
    return text[text.index("[start:quickstart]"):text.index("[end:quickstart]")]


def quickstart_blocks() -> tuple[list[str], list[object]]:
    blocks = re.findall(r"```(\w+)\n(.*?)```", quickstart(), flags=re.S)
    return [b for lang, b in blocks if lang == "bash"], [yaml.safe_load(b) for lang, b in blocks if lang == "yaml"]


@pytest.mark.slow
def test_the_quick_start_runs_as_written(quickstart_folder):
    """Every command of the README's quick start ran, in order, in a fresh folder, with the installed `darkstore`
    (the fixture); the ensemble file it shows is the one `example-data` writes."""
    work, said = quickstart_folder
    commands, shown = quickstart_blocks()
    assert commands and len(shown) == 1
    assert yaml.safe_load((work / "my-data" / "teachers" / "ensemble.yaml").read_text()) == shown[0]
    assert (work / "runs" / "first" / "student.safetensors").exists()
    assert "accuracy" in said[-1].stdout  # the last command, `darkstore eval`, printed the student's numbers


MARK = "<!-- runs in the tests:"
DOCS = ROOT / "docs"


def runnable_blocks(page: Path) -> list[str]:
    """The bash blocks a page marks as running in the tests (the line before them says so)."""
    return re.findall(re.escape(MARK) + r"[^\n]*\n```bash\n(.*?)```", page.read_text(), flags=re.S)


def run_script(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = cli_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (script, r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def quickstart_folder(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """The README's quick start run as written in a fresh folder, then the generation page's first example
    (the test store): what every page's examples start from. Returns the folder and what each step said."""
    work = tmp_path_factory.mktemp("docs-examples")
    assert shutil.which("darkstore", path=str(Path(sys.executable).parent)), "darkstore is installed beside Python"
    said = [run_script(script, work) for script in quickstart_blocks()[0]]
    run_script(runnable_blocks(DOCS / "generation.md")[0], work)
    return work, said


PAGES = sorted(p.name for p in DOCS.glob("*.md") if runnable_blocks(p))


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_a_pages_examples_run_as_written(page, quickstart_folder, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(quickstart_folder[0], work, symlinks=True)
    for script in runnable_blocks(DOCS / page):
        run_script(script, work)


def test_the_examples_that_run_cover_the_main_path():
    assert {"generation.md", "training.md", "evaluation.md", "sweeps.md", "views.md", "hints.md",
            "specialists.md"} <= set(PAGES)


def test_every_shell_example_runs_in_the_tests_or_says_why_not():
    for page in DOCS.glob("*.md"):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("```bash"):
                before = lines[i - 1] if i else ""
                assert before.startswith((MARK, "<!-- not run in the tests: ")), (page.name, i + 1)


def test_no_doc_page_points_outside_the_repository():
    for page in [README, *(ROOT / "docs").glob("*.md")]:
        assert "../shared" not in page.read_text(), page


def test_the_code_passes_ruff():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
