"""`darkstore targets`: a sequence store's targets in the formats other trainers read (and, later, their
captures in darkstore)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from interop import FORMATS, export_store, format_named
from storage import open_store

from .cli_common import _Command, _Group, _human, _progress, app, console, out

targets = typer.Typer(cls=_Group, no_args_is_help=True, help="A sequence store's targets in the dataset formats "
                      "of other trainers (axolotl, DistillKit, Hugging Face datasets / TRL)")
app.add_typer(targets, name="targets")

Format = Annotated[str, typer.Option("--format", "-f", help=f"one of: {', '.join(FORMATS)} (see `darkstore "
                                     "targets formats`)")]


@targets.command("formats", cls=_Command)
def formats():
    """The formats, what reads them and what each cannot hold."""
    t = Table(title="formats", title_justify="left", show_lines=True)
    for col in ("format", "what reads it", "not kept"):
        t.add_column(col)
    for f in FORMATS.values():
        t.add_row(f.name, f"{f.title}\n{f.source}", "\n".join(f"• {n}" for n in f.not_kept))
    out.print(t)


@targets.command("export", cls=_Command)
def export(
    store: Annotated[str, typer.Argument(help="a sequence store (local path or URL)")],
    fmt: Format,
    out_: Annotated[Path, typer.Option("--out", help="a new (or empty) folder: data/*.parquet, tokenizer/, "
                                       "darkstore-export.json")],
    k: Annotated[Optional[int], typer.Option(help="tokens per position (default: the store's K; required for "
                                             "dense targets)")] = None,
    rows_per_file: Annotated[Optional[int], typer.Option(help="rows per parquet file (default 4096)")] = None,
):
    """Write every committed row of a sequence store in another tool's format, a chunk at a time."""
    fmt_ = format_named(fmt)
    reader = open_store(store)
    with _progress() as progress:
        task = progress.add_task(f"export {fmt_.name}", total=reader.rows_done, rate="")
        report = fmt_.export(reader, out_, k=k, rows_per_file=rows_per_file,
                             progress=lambda done, total: progress.update(task, completed=done))
    console.print(f"wrote {report.rows:,} rows ({report.positions:,} positions, top-{report.k} at "
                  f"T={report.temperature:g}) as {fmt_.title} to {out_}: {len(report.files)} file(s), "
                  f"{_human(report.bytes)} ({report.bytes_per_position:.1f} B a position)", highlight=False)
    for line in report.not_kept:
        console.print(f"[yellow]not kept[/]: {line}", highlight=False)


__all__ = ["export", "export_store", "formats", "targets"]
