"""`darkstore` commands that train and judge students: `train`, `sweep`, `eval`, `export`, `report`, and
`demo`, `example-data`, `archs`."""


from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import (
    _again, app, _cache, _client, _Command, console, _data_root, _fingerprints, _human, Interrupted, _job_line,
    _json_option, out, _pct, _progress, _task, Track, Verify, VerifyData, settings_options, given_settings,
)
from .cli_store import _run_job

from student_trainer.config import TrainConfig

#: where `train`'s options differ from TrainConfig's fields (every other option is its field, one to one)
TRAIN_OPTIONS = {
    "temperature": {"annotation": Optional[float], "default": None,
                    "help": "distillation temperature T (default: 4 for classes; 1 for a language model's store, or "
                            "the T a sampled store was drawn at)"},
    "loss": {"names": ("--loss", "--objective")},
    "betas": {"annotation": Optional[str], "help": "AdamW's β1,β2, e.g. 0.9,0.95 (default: 0.9,0.999 for classes, "
                                                   "0.9,0.95 for language models)"},
}


# --- train -----------------------------------------------------------------------
def _store_of_job(job: Path, api: Optional[str], token: Optional[str], timeout: Optional[float]) -> str:
    """Submit ``job`` to the service (a known job is not rerun), wait for it, return its store."""
    with _client(api, token) as c:
        sub = c.submit(job, data_root=_data_root(None))
        console.print(("submitted " if sub.created else "found ") + _job_line(sub.job), highlight=False)
        try:
            view = c.wait(sub.id, on_progress=lambda v: None, poll=1.0, timeout=timeout)
        except TimeoutError as exc:
            console.print(f"[red]gave up[/]: {exc}", highlight=False)
            raise typer.Exit(1)
        if view.state != "succeeded":
            console.print(f"[red]job {view.id} {view.state}[/]: {escape(view.error or '')}", highlight=False)
            raise typer.Exit(1)
    console.print(f"training from {view.store}")
    return view.store


@app.command(cls=_Command)
@settings_options(TrainConfig, skip=("student",), **TRAIN_OPTIONS)
def train(
    ctx: typer.Context,
    out_: Annotated[Path, typer.Option("--out", help="run directory")],
    config: Annotated[Optional[Path], typer.Option("--config", help="a YAML/JSON file of the run's settings: any "
                                                   "training option by its name (batch_size, lr, …), student: a "
                                                   "model spec, store:, eval_store: (paths relative to the file); "
                                                   "options given here win")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE over the --config file's settings "
                                                      "(dotted keys: student.arch_kwargs.n_layer=4; repeatable)")] = None,
    store: Annotated[Optional[str], typer.Option(help="store to distill from (a directory or URL)")] = None,
    job: Annotated[Optional[Path], typer.Option(help="instead of --store: submit this job spec to the service (a known "
                                                 "job is not rerun), wait for it, train from its store")] = None,
    student: Annotated[Optional[str], typer.Option(help="student architecture (see `darkstore archs`)")] = None,
    arch_kwargs: Annotated[str, typer.Option(help="JSON keyword arguments for the architecture")] = "{}",
    student_spec: Annotated[Optional[Path], typer.Option(help="student model spec file (YAML/JSON) instead of --student")] = None,
    data: Annotated[Optional[str], typer.Option(help="transfer set (default: the one recorded in the store)")] = None,
    eval_store: Annotated[Optional[str], typer.Option(help="store over a held-out set to evaluate on (a directory or URL)")] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="inputs of --eval-store (default: as recorded)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint (a finished run is left as is)", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="delete the run already in --out and start over "
                                            "(without it, or --resume, such a folder is refused)", metavar="")] = False,
    latency: Annotated[bool, typer.Option("--latency", help="also time the student's and the teachers' CPU latency "
                                          "for eval.json (darkstore eval does it on request)", metavar="")] = False,
    allow_incomplete: Annotated[bool, typer.Option("--allow-incomplete", help="train on the finished part of an incomplete store", metavar="")] = False,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="allow code-carrying models and data factories", metavar="")] = False,
    api: Annotated[Optional[str], typer.Option("--api", help="with --job: API base URL [env DARKSTORE_API_URL]")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="with --job: bearer token [env DARKSTORE_TOKEN]")] = None,
    verify_data: VerifyData = Verify.quick,
    track: Track = None,
    job_timeout: Annotated[Optional[float], typer.Option("--job-timeout", help="with --job: give up (exit 1) when the "
                                                          "job has not finished after this many seconds")] = None,
    **settings,  # the training settings, one option each (TrainConfig's fields): read through ctx
):
    """Train one student against the store's soft targets; saves safetensors + metrics."""
    doc = _settings_file(config, set_ or [])
    store = store or doc.pop("store", None)
    eval_store = eval_store or doc.pop("eval_store", None)
    if (store is None) == (job is None):
        raise typer.BadParameter("give --store STORE or --job SPEC (one of them; or store: in --config)")
    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if job is not None:
        store = _store_of_job(job, api, token, job_timeout)
    cfg = _train_config(ctx, doc, _student_spec(student_spec, student, arch_kwargs, doc.pop("student", None)), store)
    r = _train_with_progress(cfg, store, out_, data=data, eval_data=eval_data, eval_store=eval_store,
                             allow_incomplete=allow_incomplete, allow_code=allow_code, resume=resume,
                             overwrite=overwrite, latency=latency, verify_data=verify_data, track=track)
    if r is not None:
        _print_run(r)


def _train_with_progress(cfg, store: str, out_: Path, *, data: Optional[str], eval_data: Optional[str],
                         eval_store: Optional[str], allow_incomplete: bool, allow_code: bool, verify_data: "Verify",
                         track, **options):
    """Train with a progress bar (one line an epoch where there is no terminal); None on a rank other than 0."""
    import os

    from darkstore.transfer import open_transfer_set
    from student_trainer.train import Sources, train as run

    rank0 = os.environ.get("RANK", "0") == "0"
    with _progress() as progress:
        fps = _fingerprints(verify_data, progress if rank0 else None)
        tset = open_transfer_set(data, allow_code=allow_code, fingerprints=fps) if data else None
        etset = open_transfer_set(eval_data, allow_code=allow_code, fingerprints=fps) if eval_data else None
        task = progress.add_task("training", total=cfg.total_epochs, rate="", visible=rank0)

        def on_epoch(row):
            progress.update(task, completed=row["epoch"], rate=_epoch_rate(row))
            if rank0 and progress.disable:  # a log file, CI, a notebook: no bar, so one line an epoch
                console.print(f"epoch {row['epoch']}/{cfg.total_epochs}: {_epoch_rate(row)}, "
                              f"{row.get('seconds', 0):.1f} s", highlight=False)

        try:
            sources = Sources(store, data=tset, eval_store=eval_store, eval_data=etset, fingerprints=fps,
                              allow_incomplete=allow_incomplete, allow_code=allow_code, cache_dir=_cache())
            r = run(cfg, sources, out_, on_epoch=on_epoch, log=lambda m: console.print(m), track=track or (),
                    **options)
        except KeyboardInterrupt:
            raise _train_interrupted(out_, int(_task(progress, task).completed), cfg.checkpoint_every) from None
    return r if rank0 else None


def _student_spec(student_spec: Optional[Path], student: Optional[str], arch_kwargs: Optional[str],
                  from_file: Optional[dict] = None):
    """The student `train` builds: a spec file, an architecture with its JSON arguments, or the --config file's."""
    from darkstore.models import ModelSpec

    if student_spec is not None:
        return ModelSpec.from_file(student_spec)
    if student is not None:
        return ModelSpec(arch=student, arch_kwargs=_json_option(arch_kwargs, "--arch-kwargs"))
    if from_file is not None:
        return ModelSpec.model_validate(from_file)
    raise typer.BadParameter("give --student ARCH or --student-spec FILE (or student: in --config)")


#: what a `train --config` file may hold beside the training settings
RUN_FILE_KEYS = ("student", "store", "eval_store")


def _settings_file(path: Optional[Path], sets: list[str]) -> dict:
    """A `train --config` file with ``--set`` applied: training settings by name, ``student`` (its weights and
    tokenizer relative to the file), ``store`` and ``eval_store`` (local paths relative to the file)."""
    from darkstore.models import ModelSpec
    from darkstore.specfile import apply_overrides, load_spec_file
    from student_trainer.config import TrainConfig
    from student_trainer.sweep import _relative_to

    if path is None:
        if sets:
            raise typer.BadParameter("--set changes the settings of a --config file: give --config FILE")
        return {}
    doc = load_spec_file(path)
    if not isinstance(doc, dict):
        raise typer.BadParameter(f"{path}: a run file is a mapping of settings (lr: 0.001, student: {{...}}, …)")
    doc = apply_overrides(doc, sets)
    unknown = sorted(set(doc) - set(TrainConfig.model_fields) - set(RUN_FILE_KEYS))
    if unknown:
        raise typer.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)}; a run file holds "
                                 f"{', '.join(RUN_FILE_KEYS)} and the training settings (`darkstore train --help`)")
    base = path.resolve().parent
    for k in ("store", "eval_store"):
        if doc.get(k):
            doc[k] = _relative_to(base, str(doc[k]))
    if isinstance(doc.get("student"), dict):
        doc["student"] = ModelSpec.model_validate(doc["student"]).rebased(base).model_dump(mode="json")
    return doc


def _train_config(ctx: typer.Context, doc: dict, student, store: str):
    """The run's settings: the --config file's (after --set), then every option given on the command line; an
    option left out takes its default only where the file does not set it. T left unset: the store's default."""
    from student_trainer.config import TrainConfig
    from student_trainer.kinds import store_temperature

    values = {**{n: v for n, v in ctx.params.items() if n in TrainConfig.model_fields}, **doc,
              **given_settings(ctx, TrainConfig)}
    if values.get("temperature") is None:
        values["temperature"] = store_temperature(store) or 4.0
    return TrainConfig.model_validate({**values, "student": student})


def _train_interrupted(out_: str, epochs: int, checkpoint_every: int) -> "Interrupted":
    """What Ctrl-C in `train` kept, and the command that continues."""
    kept = f"its checkpoint after epoch {epochs}" if epochs else "no finished epoch yet"
    every = f" (or a later one: --checkpoint-every {checkpoint_every})" if checkpoint_every else ""
    return Interrupted(f"{out_} keeps {kept}{every}; continue with: "
                       f"{_again(add='--resume', drop=('--overwrite',))}")


def _epoch_rate(row: dict) -> str:
    from student_trainer.kinds import epoch_text

    return epoch_text(row)


def _print_run(r) -> None:
    """What a finished `train` says: where the student went and how it did on the held-out rows."""
    from student_trainer.kinds import finished_summary, run_kind

    f = r.final
    if r.already_finished:
        console.print(f"{r.out} is already finished: nothing to train")
    if not f:  # --holdout 0 and no --eval-store: nothing was held out to evaluate on
        console.print(f"[green]saved[/] {r.out / 'student.safetensors'} ({r.num_params:,} params), metrics in "
                      f"{r.out / 'metrics.jsonl'}; no held-out rows (--holdout 0, no --eval-store): not evaluated")
        return
    console.print(f"[green]saved[/] {r.out / 'student.safetensors'} ({r.num_params:,} params), metrics in "
                  f"{r.out / 'metrics.jsonl'}, evaluation in {r.out / 'eval.json'}")
    out.print(run_kind(finished_summary(r.out)).held_out_text(f))


@app.command(cls=_Command)
def sweep(
    grid: Annotated[Path, typer.Option(help="grid file (YAML/JSON): base options, named students, axes")],
    out_: Annotated[Path, typer.Option("--out", help="sweep directory: runs/, results.*")],
    store: Annotated[Optional[str], typer.Option(help="store to distill from (default: the grid file's store)")] = None,
    eval_store: Annotated[Optional[str], typer.Option(help="held-out store every run is evaluated on")] = None,
    parallel: Annotated[Optional[int], typer.Option(help="processes at once (default: one per CPU core, or one per "
                                                    "GPU; one: the groups train in this process)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda (cuda: run i uses GPU i mod count)")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads per process (default: the cores shared "
                                                   "out among the processes running at once)")] = None,
    isolate: Annotated[bool, typer.Option("--isolate", help="train each point in its own process (default: points "
                                          "that see the same batches train together from one read)", metavar="")] = False,
    stack: Annotated[Optional[bool], typer.Option("--stack/--no-stack", help="students trained together that "
                                                  "share an architecture and optimiser: --stack steps them as one "
                                                  "stacked model (torch.func.vmap; equal within float rounding), "
                                                  "--no-stack each alone (bit-identical to a lone train); default: "
                                                  "their first steps are timed both ways and the faster is kept",
                                                  metavar="")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="allow code-carrying models and data factories", metavar="")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE over the grid file (dotted keys: "
                                                      "base.epochs=3, 'grid.seed=[0, 1]'; repeatable)")] = None,
    verify_data: VerifyData = Verify.quick,
    track: Track = None,
):
    """Train every grid point (points that differ only in per-student settings together, from one read of the
    store; the rest in parallel processes); finished points are skipped; writes mean ± std over seeds. A grid
    file with a job: fills its store from that job first (resumable)."""
    from student_trainer.config import unused_settings
    from student_trainer.sweep import GridSpec, markdown_table, points, run_sweep

    spec = GridSpec.from_file(grid, set_ or [])
    n = len(points(spec))
    t0 = time.perf_counter()
    if spec.job:  # the teachers first, in this process: a sweep at one process at a time loads torch once
        from teacher_service.spec import JobSpec

        if not (store or spec.store):
            raise typer.BadParameter("the grid file's job: needs a store: (or --store) to fill")
        _run_job(JobSpec.from_file(spec.job), store or spec.store, None, verify_data,
                 device=device or spec.base.get("device", "cpu"),
                 allow_code=allow_code)
    with _progress() as progress:
        task = progress.add_task("sweep", total=n, rate="")

        def on_event(o, done, total):
            progress.update(task, completed=done, rate=o.point.name)
            if o.state == "started":
                console.print(f"training {o.point.name}: its lines go to {o.error}", highlight=False)
            elif o.state == "epoch":
                if progress.disable:  # a log file, CI, a notebook: no bar, so one line per point and epoch
                    e = o.epoch
                    console.print(f"{o.point.name} epoch {e['epoch']}/{o.point.config.total_epochs}: "
                                  f"{_epoch_rate(e)}, {o.seconds:.0f} s", highlight=False)
            elif o.state == "failed":
                console.print(f"[red]failed[/] {o.point.name}: {escape(o.error)}", highlight=False)
            elif o.state == "busy":
                console.print(f"[yellow]busy[/] {o.point.name}: {o.error}", highlight=False)
            elif o.state == "finished":
                console.print(f"finished {o.point.name} in {o.seconds:.1f} s", highlight=False)
            elif o.state == "same":
                unused = ", ".join(sorted(unused_settings(o.point.config)))
                console.print(f"same run {o.point.name} = {o.error} ({unused} unused there)", highlight=False)

        try:
            r = run_sweep(spec, out_, store=store, eval_store=eval_store, parallel=parallel, device=device,
                          threads=threads, isolate=isolate, stack="auto" if stack is None else stack,
                          allow_code=allow_code, on_event=on_event,
                          fingerprints=_fingerprints(verify_data), track=track or (), cache_dir=_cache())
        except KeyboardInterrupt:
            raise Interrupted(f"finished points are kept in {out_ / 'runs'} and unfinished ones keep their last "
                              f"checkpoint; continue with: {_again()}") from None
    skipped = sum(o.state == "skipped" for o in r.outcomes)
    trained = sum(o.state == "finished" for o in r.outcomes)
    same = sum(o.state == "same" for o in r.outcomes)
    console.print(f"{n} points: {trained} trained now, {skipped} already finished, "
                  + (f"{same} the same run as another, " if same else "") + f"{len(r.failed)} failed "
                  f"({time.perf_counter() - t0:.1f} s); results in {r.out / 'results.md'}", highlight=False)
    out.print(markdown_table(r.table, list(spec.grid)), highlight=False, markup=False)
    if r.failed:
        raise typer.Exit(1)


@app.command("eval", cls=_Command)
def eval_(
    run: Annotated[Path, typer.Argument(help="a finished run directory")],
    store: Annotated[Optional[str], typer.Option(help="evaluate on this labeled store instead (all its rows)")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    no_latency: Annotated[bool, typer.Option("--no-latency", help="skip the CPU latency measurements", metavar="")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole report as JSON", metavar="")] = False,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="allow code-carrying teachers/data", metavar="")] = False,
    verify_data: VerifyData = Verify.quick,
):
    """Accuracy, agreement, NLL, ECE, confusion matrix and the student-vs-teachers cost of a run (a language
    model's: perplexity, bits per byte, top-1 and agreement beside the teachers')."""
    from student_trainer.runs import evaluate_run

    rep = evaluate_run(run, store=store, device=device, latency=not no_latency, allow_code=allow_code,
                       fingerprints=_fingerprints(verify_data), cache_dir=_cache())
    if as_json:
        out.print_json(json.dumps(rep))
        return
    from storage.kinds import Classes, Tokens
    from student_trainer.kinds import finished_summary, run_kind

    printers = {Classes.name: _print_class_eval, Tokens.name: _print_lm_eval}  # each kind's table
    printers[run_kind(finished_summary(run)).name](run, rep)
    if rep.get("note"):
        console.print(f"[yellow]note[/]: {rep['note']}")
    if store is None:
        console.print(f"written to {run / 'eval.json'}")


def _vs_table() -> Table:
    """The student beside its teachers: a row per measure."""
    t = Table()
    for col in ("", "student", "teacher ensemble"):
        t.add_column(col, justify="right" if col else "left")
    return t


def _print_lm_eval(run: Path, rep: dict) -> None:
    m, tm, comp = rep["metrics"], rep["teacher_metrics"], rep["compression"]
    st, te = comp["student"], comp["teachers"]
    out.print(f"{run}: {rep['positions']:,} positions in {rep['rows']} rows of {rep['store']}", highlight=False)
    t = _vs_table()

    def num(v, fmt=".3f") -> str:
        return "—" if v is None else format(v, fmt)

    t.add_row("perplexity", num(m.get("perplexity")), num(tm.get("perplexity")))
    t.add_row("bits per byte", num(m.get("bits_per_byte"), ".4f"), num(tm.get("bits_per_byte"), ".4f"))
    t.add_row("top-1 (next token)", _pct(m.get("top1")), "")
    t.add_row("agreement with teachers", _pct(m.get("agreement")), "")
    t.add_row("parameters", f"{st['params']:,}", f"{te['params']:,}")
    t.add_row("size on disk", _human(st["size_bytes"]) if st.get("size_bytes") else "—",
              _human(te["size_bytes"]) if te.get("size_bytes") else "—")
    out.print(t)
    if tm.get("source"):
        out.print(f"the teachers' perplexity: from {tm['source']}", highlight=False)


def _print_class_eval(run: Path, rep: dict) -> None:
    m, tm, comp = rep["metrics"], rep["teacher_metrics"], rep["compression"]
    st, te = comp["student"], comp["teachers"]
    out.print(f"{run}: {rep['rows']} rows of {rep['store']}", highlight=False)
    t = _vs_table()
    t.add_row("accuracy", _pct(m.get("accuracy")), _pct(tm.get("accuracy")))
    t.add_row("agreement with teachers", _pct(m.get("agreement")), "")
    t.add_row("NLL", f"{m['nll']:.4f}" if "nll" in m else "—", f"{tm['nll']:.4f}" if "nll" in tm else "—")
    t.add_row("ECE", _pct(m.get("ece")), _pct(tm.get("ece")))
    t.add_row("parameters", f"{st['params']:,}", f"{te['params']:,}")
    t.add_row("size on disk", _human(st["size_bytes"]) if st.get("size_bytes") else "—",
              _human(te["size_bytes"]) if te.get("size_bytes") else "—")
    if "latency_ms_batch1" in st:
        t.add_row("CPU latency (batch 1)", f"{st['latency_ms_batch1']:.3f} ms",
                  f"{te['latency_ms_batch1']:.3f} ms" if "latency_ms_batch1" in te else te.get("latency_error", "—"))
        t.add_row("CPU throughput", f"{st['throughput_per_s']:,.0f}/s",
                  f"{te['throughput_per_s']:,.0f}/s" if "throughput_per_s" in te else "—")
    out.print(t)
    if rep.get("confusion"):
        _print_confusion(rep["confusion"], rep.get("class_names"))


#: classes up to which `eval` prints the whole confusion matrix; beyond, the pairs most often confused
CONFUSION_MATRIX_MAX = 20


def _print_confusion(matrix: list[list[int]], class_names: list[str] | None, top: int = 10) -> None:
    names = [str(n) for n in (class_names or range(len(matrix)))]
    if len(names) <= CONFUSION_MATRIX_MAX:
        out.print("confusion matrix (rows: true class, columns: predicted)")
        c = Table()
        c.add_column("")
        for n in names:
            c.add_column(n, justify="right")
        for n, row in zip(names, matrix):
            c.add_row(n, *[str(v) if v else "·" for v in row])
        out.print(c)
        return
    pairs = sorted(((v, i, j) for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v),
                   reverse=True)[:top]
    if not pairs:
        out.print(f"no confusions among the {len(names)} classes")
        return
    out.print(f"the {len(pairs)} confusions most often made of {len(names)} classes (the whole matrix is in "
              "eval.json)")
    c = Table()
    for col in ("true class", "predicted as", "rows"):
        c.add_column(col, justify="right" if col == "rows" else "left")
    for v, i, j in pairs:
        c.add_row(names[i], names[j], str(v))
    out.print(c)


@app.command(cls=_Command)
def export(
    run: Annotated[Path, typer.Argument(help="a finished run directory")],
    format_: Annotated[list[str], typer.Option("--format", help="safetensors | torchscript | onnx; a language "
                                                "model's run: safetensors | transformers (repeatable)")],
    out_: Annotated[Optional[Path], typer.Option("--out", help="folder (default RUN/export/FORMAT)")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="allow a student (or transfer set) built by a module:function factory", metavar="")] = False,
):
    """Export the student; each export is reloaded and compared with the PyTorch student."""
    from student_trainer.runs import export_run

    for fmt in format_:
        dest = (out_ / fmt if len(format_) > 1 else out_) if out_ is not None else None
        r = export_run(run, fmt, dest, allow_code=allow_code)
        console.print(f"[green]{fmt}[/]: {r.path} ({_human(r.size_bytes)}); reloaded, max |Δ| = {r.max_abs_diff:.2e} "
                      f"≤ {r.tolerance:.2e} at batch sizes {r.batch_sizes}", highlight=False)


@app.command(cls=_Command)
def report(
    root: Annotated[Path, typer.Argument(help="a sweep directory, a run, or a folder of runs")],
    format_: Annotated[str, typer.Option("--format", help="html | md")] = "html",
    out_: Annotated[Optional[Path], typer.Option("--out", help="folder (default ROOT/report)")] = None,
):
    """A self-contained report with PNG plots: curves, accuracy vs T and α, reliability, student vs teachers."""
    from student_trainer.report import make_report

    path = make_report(root, fmt=format_, out=out_)
    console.print(f"[green]report[/]: {path}")


# --- demo ------------------------------------------------------------------------
@app.command(cls=_Command)
def demo(
    out_: Annotated[Path, typer.Option("--out", help="folder for data, teachers, stores, runs and results")] = Path("darkstore-demo"),
    seeds: Annotated[int, typer.Option(help="student seeds")] = 3,
    quick: Annotated[bool, typer.Option("--quick", help="a few epochs only (smoke test)", metavar="")] = False,
):
    """The whole pipeline on scikit-learn's real handwritten digits: teachers, store, baseline vs distilled students."""
    from darkstore_app.demo import run_demo

    t0 = time.perf_counter()
    r = run_demo(out_, seeds=seeds, quick=quick, log=lambda m: console.print(m))
    out.print()
    out.print(r.table)
    console.print(f"\n[green]done[/] in {time.perf_counter() - t0:.0f} s; everything is under {r.out.resolve()} "
                  f"(results.md, results.json, stores/, runs/, teachers/)")
    console.print(f"next, the α grid over 12 students: darkstore sweep --grid {out_ / 'alpha_grid.yaml'} "
                  f"--out {out_ / 'sweep'} && darkstore report {out_ / 'sweep'}", highlight=False)


@app.command("example-data", cls=_Command)
def example_data(
    root: Annotated[Path, typer.Argument(help="data root to fill (the service's DARKSTORE_DATA_ROOTS)")],
    quick: Annotated[bool, typer.Option("--quick", help="teachers trained for a few epochs only", metavar="")] = False,
    lm: Annotated[bool, typer.Option("--lm", help="a language-model example instead: the json package's sources, "
                                     "a tokenizer trained on them, two small GPT teachers, job.yaml", metavar="")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="a conversations example instead: questions with a right "
                                       "answer in a chat template, two small GPT teachers trained on the answers, "
                                       "job.yaml (the teachers write their answers) and gold.yaml", metavar="")] = False,
):
    """Write a ready-to-submit example into a data root: digits, trained teachers, job.yaml, student.yaml (or,
    with --lm, a language-model job; with --chat, conversations the teachers answer)."""
    if chat:
        from darkstore_app.lmkit import write_chat_example

        job = write_chat_example(root, steps=60 if quick else 600, records=600 if quick else 2000,
                                 log=lambda m: console.print(m))
        console.print(f"[green]ready[/]: the teachers write their answers with `darkstore generate --job {job} "
                      "--out STORE`, or submit it")
        return
    if lm:
        from darkstore_app.lmkit import write_lm_example

        job = write_lm_example(root, steps=40 if quick else 150, log=lambda m: console.print(m))
        console.print(f"[green]ready[/]: generate with `darkstore generate --job {job} --out STORE`, or submit it")
        return
    from darkstore_app.demo import write_example

    job = write_example(root, quick=quick, log=lambda m: console.print(m))
    console.print(f"[green]ready[/]: submit {job} (e.g. `darkstore submit {job} --wait`)")


@app.command(cls=_Command)
def archs(
    layers: Annotated[Optional[str], typer.Option(help="list this architecture's layers (module names for "
                                                  "--keep-features and --student-layer)")] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option(help="JSON constructor arguments for --layers")] = None,
):
    """List the architectures teachers and students can use, or one architecture's layers."""
    from darkstore.models import BUILTINS, build_model, torchvision_classifiers

    if layers is None:
        out.print("built-in: " + ", ".join(sorted(BUILTINS)))
        out.print("torchvision: " + ", ".join(torchvision_classifiers()))
        try:
            import timm
        except ImportError:
            out.print("timm/<model>: not installed (pip install 'darkstore[timm]')")
        else:
            out.print(f"timm/<model>: any of timm's {len(timm.list_models()):,} models (timm.list_models()), "
                      "e.g. timm/resnet50, timm/convnext_tiny", highlight=False)
        return
    kwargs = _json_option(arch_kwargs, "--arch-kwargs")
    model = build_model(layers, int(kwargs.pop("num_classes", 10)), **kwargs)  # the head's size: any will do
    for name, module in model.named_modules():
        if name:
            out.print(f"{name}  {type(module).__name__}", highlight=False)
