"""`darkstore targets`: a sequence store's targets in the formats other trainers read (and, later, their
captures in darkstore)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .cli_common import _Command, _Group, _human, _progress, app, console, out

targets = typer.Typer(cls=_Group, no_args_is_help=True, help="A sequence store's targets in the dataset formats "
                      "of other trainers (axolotl, DistillKit, Hugging Face datasets / TRL)")
app.add_typer(targets, name="targets")

Format = Annotated[str, typer.Option("--format", "-f", help="the format's name (`darkstore targets formats` lists "
                                     "them)")]


@targets.command("formats", cls=_Command)
def formats():
    """The formats, what reads them and what each cannot hold."""
    from interop import FORMATS

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
    from interop import format_named
    from storage import open_store

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



@targets.command("import", cls=_Command)
def import_(
    capture: Annotated[Path, typer.Argument(help="the capture: a file or folder in the format's layout")],
    fmt: Format,
    out_: Annotated[str, typer.Option("--out", help="the store to write (a new one, or this import's to resume)")],
    tokenizer: Annotated[Path, typer.Option(help="the tokenizer the capture's ids come from (a local folder or "
                                            "tokenizer.json): checked against them; its chat template renders "
                                            "an axolotl dataset of conversations")],
    k: Annotated[Optional[int], typer.Option(help="vllm: the K the capture asked for (default: the fewest entries "
                                             "at a position of its first row)")] = None,
    name: Annotated[Optional[str], typer.Option(help="the teacher's name in the store (default FORMAT-capture)")] = None,
    temperature: Annotated[float, typer.Option(help="the temperature the capture's log-probabilities are at")] = 1.0,
    step: Annotated[float, typer.Option(help="store each kept value as uint8 steps of this many nats below its "
                                        "position's largest (0: float32, as captured)")] = 0.0,
    length: Annotated[Optional[int], typer.Option(help="positions per row: shorter rows are padded (default: a "
                                                  "darkstore export's store length, else the longest row)")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="rows per chunk (default: about 65,536 positions)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace another job's store at --out")] = False,
):
    """Write a capture made by another tool (vLLM prompt_logprobs, DistillKit, axolotl, a datasets top-K
    layout) into a darkstore store, checked against the tokenizer; then train, sweep and evaluate on it."""
    from interop import import_capture

    with _progress() as progress:
        task = progress.add_task("import", total=None, rate="")

        def moved(done, total):
            progress.update(task, completed=done, total=total)

        report = import_capture(fmt, capture, out_, tokenizer, k=k, name=name, temperature=temperature, step=step,
                                chunk_rows=chunk_rows, length=length, overwrite=overwrite,
                                progress=moved)
    console.print(f"imported {report.rows:,} rows ({report.positions:,} positions with a loss, top-{report.k}, "
                  f"rows of {report.length}) into {report.store}: {report.written_chunks} chunk(s) written"
                  + (f", {report.floored:,} tails below what float32 resolves (stored at the floor)"
                     if report.floored else "")
                  + (f"; the next token is among the kept {report.k} at {report.label_kept:.1%} of the positions "
                     "written with a loss (a capture aligned a position off shows far less than its "
                     "teacher's usual share)" if report.label_kept is not None else ""), highlight=False)


__all__ = ["export", "formats", "import_", "targets"]
