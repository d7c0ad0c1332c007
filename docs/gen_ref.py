"""Reference pages generated at every docs build (mkdocs-gen-files), from the code itself, so none can drift:

- reference/cli.md: every `darkstore` command with its options, from the typer app;
- reference/rest.md: every route with its parameters and answers, from the API's OpenAPI schema;
- reference/settings.md: every DARKSTORE_ setting, from teacher_service.settings.Settings;
- reference/store-fields.md: every store field, from storage.fields.FIELDS.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import click
import mkdocs_gen_files
import typer


def _cell(text: object) -> str:
    """One table cell: one line, pipes escaped, angle brackets shown as written (not read as HTML)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    return flat.split(". ")[0].rstrip(".") + "." if flat else ""


def cli_page() -> str:
    from darkstore_app.cli import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="darkstore")
    lines = ["# Command line reference", "",
             "Generated from the `darkstore` command itself at every docs build. `darkstore COMMAND --help` "
             "prints the same.", "", "| command | what it does |", "|---|---|"]
    commands = sorted(root.list_commands(ctx))
    for name in commands:
        cmd = root.get_command(ctx, name)
        lines.append(f"| [`{name}`](#{name}) | {_cell(_first_sentence(cmd.help or ''))} |")
    for name in commands:
        cmd = root.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        lines += ["", f"## {name}", "", f"```\n{cmd.get_usage(sub)}\n```", "", inspect.cleandoc(cmd.help or ""), ""]
        params = [p for p in cmd.get_params(sub) if p.name != "help"]
        if params:
            lines += ["| option | default | meaning |", "|---|---|---|"]
            for p in params:
                if isinstance(p, click.Argument):
                    names = p.name.upper()
                else:
                    names = ", ".join(p.opts + p.secondary_opts)
                default = p.default if p.default not in (None, (), [], False) else ""
                if callable(default):
                    default = ""
                default = getattr(default, "value", default)
                lines.append(f"| `{names}` | {_cell(default) and '`' + _cell(default) + '`'} | "
                             f"{_cell(getattr(p, 'help', '') or '')} |")
    return "\n".join(lines) + "\n"


def rest_page() -> str:
    from teacher_service.api import create_app

    spec = create_app().openapi()
    lines = ["# REST reference", "",
             "Generated from the API's OpenAPI schema at every docs build; a running API serves the same schema "
             "at `/openapi.json` and interactive docs at `/docs`. Every error answers "
             '`{"error": KIND, "detail": TEXT}` with the status below.', ""]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            lines += [f"## `{method.upper()} {path}`", "", f"**{op.get('summary', '')}**", "",
                      inspect.cleandoc(op.get("description", "")), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | meaning |", "|---|---|---|"]
                for prm in params:
                    lines.append(f"| `{prm['name']}` | {prm['in']} | {_cell(prm.get('description', ''))} |")
                lines.append("")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if body:
                lines += [f"Body: `{body.get('$ref', '').rsplit('/', 1)[-1] or body.get('type', 'JSON')}` "
                          "(JSON; its fields in the schema at `/openapi.json`).", ""]
            lines += ["| status | meaning |", "|---|---|"]
            for code, r in op.get("responses", {}).items():
                lines.append(f"| {code} | {_cell(r.get('description', ''))} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def settings_page() -> str:
    from teacher_service.settings import Settings

    lines = ["# Settings reference", "",
             "The API, the Celery workers and the CLI's service commands read one settings object from "
             "`DARKSTORE_*` environment variables (the compose file's `environment:` sets them for the whole "
             "pipeline). Generated from `teacher_service/settings.py` at every docs build.", "",
             "| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "" if default in (None, []) else f"`{_cell(default)}`"
        lines.append(f"| `DARKSTORE_{name.upper()}` | {shown} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def fields_page() -> str:
    from storage.fields import FIELDS
    from storage.kinds import KINDS
    from storage.schema import SCHEMA_VERSION

    # the dtypes of a store of classes (a sequence store's ids take the narrowest that holds its vocabulary)
    sym = SimpleNamespace(dtype="the store's dtype", sequence=None, targets=SimpleNamespace(quantised=False),
                          kind=KINDS["classes"])
    lines = ["# Store fields", "",
             f"Every array of a store (schema {SCHEMA_VERSION}), generated from `storage/fields.py`, where each is "
             "declared once. A *row field* holds one entry per store row, chunked by `chunk_rows` along its row "
             "axis; a *chunk field* one element per chunk.", "",
             "| field | dims | dtype | kind | present | holds |", "|---|---|---|---|---|---|"]
    for f in FIELDS:
        lines.append(f"| `{f.name}` | {', '.join(f.dims_for(None))} | {f.dtype(sym)} | {'row' if f.per_row else 'chunk'} | "
                     f"{f.when} | {_cell(f.doc)} |")
    return "\n".join(lines) + "\n"


for path, make in (("reference/cli.md", cli_page), ("reference/rest.md", rest_page),
                   ("reference/settings.md", settings_page), ("reference/store-fields.md", fields_page)):
    with mkdocs_gen_files.open(path, "w") as fh:
        fh.write(make())
