"""The `darkstore` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from darkstore.errors import DarkstoreError, SpecError

class _FlagHelp:
    """Help options are flags: no value, so no type in the help (typer would print `<bool>`)."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="darkstore",
    help="Run a teacher ensemble once over a transfer set; distill many students from the cached soft targets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)  # messages stay one greppable line
out = Console(width=None if sys.stdout.isatty() else 160)  # tables stay whole in logs and pipes


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal and not _force_progress(),
    )


def _task(progress: Progress, task_id):
    return next(t for t in progress.tasks if t.id == task_id)


def _force_progress() -> bool:
    import os

    return os.environ.get("DARKSTORE_PROGRESS", "") == "1"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class Verify(str, Enum):
    quick = "quick"
    full = "full"


Track = Annotated[Optional[list[str]], typer.Option(
    "--track", help="also send each run's metrics to: tensorboard (event files in RUN/tensorboard; repeatable)")]
VerifyData = Annotated[Verify, typer.Option(
    "--verify-data", help="quick: the transfer set is read whole once, then checked against its fingerprint "
    "manifest (files' size and mtime, a sample re-read) kept in $DARKSTORE_CACHE (default ~/.cache/darkstore); "
    "full: hash every file again")]


def _cache() -> Path:
    """The CLI's cache folder ($DARKSTORE_CACHE, else ~/.cache/darkstore): fingerprint manifests, teacher costs."""
    from darkstore.paths import user_cache_dir

    return user_cache_dir()


def _fingerprints(verify: Verify | str, progress: Progress | None = None):
    """How this command fingerprints transfer sets: through the user's manifest cache, with a progress bar
    while a large set is read whole."""
    from darkstore.fingerprint import FingerprintPolicy

    task: dict = {}

    def on_bytes(done: int, total: int) -> None:
        if progress is None or total < (64 << 20):  # small sets hash in a blink
            return
        if "id" not in task:
            task["id"] = progress.add_task("fingerprinting the transfer set", total=total, rate="")
        progress.update(task["id"], completed=done, rate=f"{_human(done)} of {_human(total)}")

    return FingerprintPolicy(cache_dir=_cache() / "fingerprints", verify=Verify(verify).value,
                             progress=on_bytes)


# --- generate ---------------------------------------------------------------------
@app.command(cls=_Command)
def generate(
    out_: Annotated[str, typer.Option("--out", help="store to create or resume: a directory, file:///…, s3://bucket/prefix")],
    teachers: Annotated[Optional[Path], typer.Option(help="ensemble spec (YAML/JSON)")] = None,
    data: Annotated[Optional[str], typer.Option(help="transfer set: spec file (YAML/JSON), .npz/.npy, or image folder")] = None,
    job: Annotated[Optional[Path], typer.Option(help="a whole job spec file instead of --teachers/--data/options")] = None,
    combine: Annotated[str, typer.Option(help="geometric | arithmetic | specialists (a generalist and the "
                                         "specialists the ensemble file names, Hinton et al.'s combination)")] = "geometric",
    temperature: Annotated[float, typer.Option(help="generation temperature (used by arithmetic)")] = 1.0,
    top_n: Annotated[int, typer.Option(help="with --combine specialists: a row's specialists are those whose classes "
                                       "meet the generalist's top N")] = 1,
    keep_members: Annotated[bool, typer.Option("--keep-members", help="also store each teacher's logits", metavar="")] = False,
    targets: Annotated[Optional[str], typer.Option(help="dense (default: every class) | topk:K (the K largest values "
                                                   "and the tail's mass) | sampled:K[@T] (K classes drawn per row)")] = None,
    keep_features: Annotated[Optional[list[str]], typer.Option(
        "--keep-features", help="TEACHER:LAYER — also store this teacher layer's output per row (FitNets' hints; "
        "repeat for more layers)")] = None,
    feature_pool: Annotated[Optional[int], typer.Option(help="average-pool each kept [C, H, W] layer to "
                                                        "[C, P, P]")] = None,
    feature_project: Annotated[Optional[int], typer.Option(help="then project each kept layer to D dimensions "
                                                           "(a fixed seeded Gaussian matrix)")] = None,
    dtype: Annotated[str, typer.Option(help="float16 | float32")] = "float16",
    compressor: Annotated[str, typer.Option(help="zstd | blosc | none")] = "zstd",
    chunk_rows: Annotated[Optional[int], typer.Option(help="rows per chunk: the unit of work and commit (default: 1,024 "
                                                      "rows of classes; token rows of about 65,536 positions)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="rows per forward pass (default: 256 rows of classes; "
                                                      "token rows of about 8,192 positions)")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader processes decoding inputs (default: none for "
                                                       "arrays files, else up to 8; half the cores on the CPU)")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    precision: Annotated[str, typer.Option(help="teacher forward precision: float32 | bfloat16 | float16 (autocast)")] = "float32",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="run conv teachers in channels-last memory format", metavar="")] = False,
    writer_processes: Annotated[Optional[bool], typer.Option("--writer-processes/--writer-threads", help="store writes in "
                                                             "forked processes or threads (default: processes on CUDA)", metavar="")] = None,
    row_order: Annotated[Optional[str], typer.Option(help="shuffled (default: samples in a seeded random order, so "
                                                     "class-sorted data streams well-mixed) | natural")] = None,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="allow TorchScript/export files and module:function factories", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a store of another job at --out", metavar="")] = False,
    views: Annotated[Optional[int], typer.Option(help="K recorded views per sample (needs --augment)")] = None,
    augment: Annotated[Optional[str], typer.Option(help="augmentation recipe: YAML/JSON file or inline JSON "
                                                   "({ops: [...]} or a list of ops); see darkstore.views")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: compute only shard I of N (chunks c with c % N == I). "
                                                 "Run N processes, on N machines sharing --out, to fill one store "
                                                 "once; shard 0 creates the store")] = None,
    wait: Annotated[float, typer.Option(help="--shard I/N with I > 0: seconds to wait for shard 0 to create the "
                                        "store")] = 600.0,
    verify_data: VerifyData = Verify.quick,
):
    """Run the teacher ensemble over the transfer set into a chunked Zarr store (resumable)."""
    from teacher_service.generate import Shard

    part = Shard.parse(shard) if shard is not None else None
    spec = _job_spec(job, teachers, data, {
        "combine": combine, "temperature": temperature, "dtype": dtype, "compressor": compressor,
        "chunk_rows": chunk_rows, "keep_members": keep_members, "precision": precision, "specialist_top_n": top_n,
    }, augment=augment, views=views, row_order=row_order, targets=targets, keep_features=keep_features,
        feature_pool=feature_pool, feature_project=feature_project)
    _run_job(spec, out_, part, verify_data, device=device, batch_size=batch_size, num_workers=num_workers,
             allow_code=allow_code, overwrite=overwrite, channels_last=channels_last, wait=wait,
             writer_processes=writer_processes)


def _run_job(spec, out_: str, part, verify_data: "Verify", **options) -> None:
    """Fill ``out_`` from the job ``spec`` in this process, with progress (`generate`, and `sweep` with a job)."""
    from teacher_service.generate import generate as run

    t0 = time.perf_counter()
    with _progress() as progress:
        shown = _GenerationProgress(progress, part)
        try:
            writer = run(spec, out_, on_start=shown.start, on_rows=shown.rows, shard=part,
                         fingerprints=_fingerprints(verify_data, progress), **options)
        except KeyboardInterrupt:
            if shown.id is None:
                raise Interrupted("nothing was computed yet; rerun the same command to start") from None
            t = _task(progress, shown.id)
            raise Interrupted(f"{int(t.completed):,} of {int(t.total):,} {shown.unit} are committed in {out_} and "
                              f"kept; continue with: {_again(drop=('--overwrite',))}") from None
    _say_generated(writer, part, shown.n, time.perf_counter() - t0)


class _GenerationProgress:
    """`generate`'s progress: a bar, or a line per tenth of the work where output is not a terminal; in rows
    of classes, or in tokens (positions) of a sequence store."""

    def __init__(self, progress, part):
        self.progress, self.part = progress, part
        self.id, self.n, self.per, self.unit, self.said = None, 0, 1, "rows", None

    def start(self, writer, chunks) -> None:
        meta, part = writer.meta, self.part
        self.per, self.unit = meta.positions_per_row, "tokens" if meta.sequence else "rows"
        mine = meta.num_rows if part is None else sum(
            b - a for a, b in map(writer.bounds, part.chunks(range(meta.n_chunks))))
        done = mine - sum(b - a for a, b in map(writer.bounds, chunks))
        self.id = self.progress.add_task("generating" if part is None else f"shard {part}",
                                         total=mine * self.per, completed=done * self.per, rate="")
        self.t = time.perf_counter()
        what = "this job's store is" if part is None else f"shard {part} of this job's store is"
        if done == mine:
            console.print(f"{what} already complete: nothing to compute")
        elif done:
            console.print(f"resuming: {done} of {mine} rows already committed")

    def rows(self, n: int) -> None:
        self.n += n
        n *= self.per
        rate = self.n * self.per / max(1e-9, time.perf_counter() - self.t)
        self.progress.update(self.id, advance=n, rate=f"{rate:,.0f} {self.unit}/s")
        if not self.progress.disable:
            return
        t = _task(self.progress, self.id)  # a log file, CI, a notebook: no bar, so a line every tenth
        tenth = int(10 * t.completed / max(1, t.total))
        if tenth > (self.said if self.said is not None else int(10 * (t.completed - n) / max(1, t.total))):
            self.said = tenth
            console.print(f"{t.description}: {int(t.completed):,} of {int(t.total):,} {self.unit} "
                          f"({100 * t.completed / max(1, t.total):.0f} %), {rate:,.0f} {self.unit}/s",
                          highlight=False)


def _job_spec(job: Optional[Path], teachers: Optional[Path], data: Optional[str], options: dict, *,
              augment: Optional[str], views: Optional[int], row_order: Optional[str], targets: Optional[str],
              keep_features: Optional[list[str]], feature_pool: Optional[int], feature_project: Optional[int]):
    """The job `generate` runs: a job file, or --teachers/--data with the options; then the options that
    refine either (views, row order, targets, kept features)."""
    from darkstore.data import parse_data_spec
    from teacher_service.spec import EnsembleSpec, JobSpec

    if job is not None:
        spec = JobSpec.from_file(job)
    else:
        if teachers is None or data is None:
            raise typer.BadParameter("give --teachers and --data, or --job")
        spec = JobSpec.model_validate({"teachers": EnsembleSpec.from_file(teachers), "data": parse_data_spec(data),
                                       **options})
    if augment is not None or views is not None:
        spec = spec.model_copy(update={"augment": _augment_spec(augment, views, spec.augment)})
    if row_order is not None:
        spec = JobSpec.model_validate({**spec.model_dump(), "row_order": row_order})
    if targets is not None:
        spec = JobSpec.model_validate({**spec.model_dump(), "targets": targets})
    if keep_features:
        kept = [{"teacher": f.partition(":")[0], "layer": f.partition(":")[2], "pool": feature_pool,
                 "project": feature_project} if ":" in f else f for f in keep_features]
        spec = JobSpec.model_validate({**spec.model_dump(), "features": kept})
    elif feature_pool is not None or feature_project is not None:
        raise typer.BadParameter("--feature-pool and --feature-project reduce the layers named by --keep-features")
    return spec


def _say_generated(writer, part, wrote: int, took: float) -> None:
    left = writer.pending_chunks()
    if not left:
        out.print(f"[green]store complete[/]: {writer.path} ({writer.meta.num_rows} rows; {wrote} computed "
                  f"{'now' if part is None else f'by shard {part}'} in {took:.1f} s)")  # the result: stdout
    else:  # only a shard ends before the store does
        console.print(f"[green]shard {part} complete[/]: {wrote} rows computed now in {took:.1f} s; the store at "
                      f"{writer.path} still waits for {len(left)} of {writer.meta.n_chunks} chunks from the other "
                      "shards", highlight=False)


def _augment_spec(augment: str | None, views: int | None, current):
    from darkstore.specfile import load_spec_file
    from darkstore.views import AugmentSpec

    if augment is None:
        if current is None:
            raise typer.BadParameter("--views needs --augment (the recipe that makes the views)")
        doc = current.model_dump(mode="json")
    elif Path(augment).is_file():
        doc = load_spec_file(augment)
    else:
        try:
            doc = json.loads(augment)
        except ValueError:
            raise typer.BadParameter(f"--augment {augment!r} is neither a file nor JSON") from None
    if isinstance(doc, list):
        doc = {"ops": doc}
    if views is not None:
        doc = {**doc, "views": views}
    return AugmentSpec.model_validate(doc)


# --- specialists ---------------------------------------------------------------------
specialists = typer.Typer(cls=_Group, no_args_is_help=True, help="Hinton's specialists: a generalist plus "
                          "specialists on the classes it confuses, combined into one soft target")
app.add_typer(specialists, name="specialists")


@specialists.command("plan", cls=_Command)
def specialists_plan(
    store: Annotated[str, typer.Option(help="the generalist's store (dense targets)")],
    num: Annotated[int, typer.Option(help="clusters of classes (groups smaller than --min-size stay uncovered)")],
    out_: Annotated[Path, typer.Option("--out", help="plan file to write (YAML)")] = Path("specialists.yaml"),
    seed: Annotated[int, typer.Option(help="k-means seed: the same seed, the same plan")] = 0,
    min_size: Annotated[int, typer.Option(help="fewest classes a specialist takes")] = 2,
):
    """Cluster the classes the generalist confuses (k-means on the covariance of its predictions) into
    specialists' class subsets; writes the plan and prints the most confused pairs."""
    import yaml

    from storage import open_store
    from teacher_service.specialists import plan_specialists

    plan = plan_specialists(open_store(store), num, seed=seed, min_size=min_size)
    doc = plan.to_json()
    out_.parent.mkdir(parents=True, exist_ok=True)
    out_.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    t = Table(title=f"{len(plan.subsets)} specialists over {plan.num_classes} classes "
              f"({len(plan.uncovered)} uncovered)", title_justify="left")
    for col in ("specialist", "classes", "size"):
        t.add_column(col)
    for sp in doc["specialists"]:
        names = ", ".join(sp["class_names"][:12]) + (" …" if sp["size"] > 12 else "")
        t.add_row(sp["name"], names, str(sp["size"]))
    out.print(t)
    if plan.confused:
        c = Table(title="most confused pairs (how often one is the other's runner-up)", title_justify="left")
        for col in ("classes", "rows", "covariance"):
            c.add_column(col)
        for pair in plan.confused:
            a, b = pair["classes"]
            c.add_row(f"{plan.name(a)} / {plan.name(b)}", str(pair["runner_up_rows"]), f"{pair['covariance']:.3g}")
        out.print(c)
    console.print(f"plan written to {out_}")


@specialists.command("train", cls=_Command)
def specialists_train(
    plan: Annotated[Path, typer.Option(help="the plan file from `darkstore specialists plan`")],
    out_: Annotated[Path, typer.Option("--out", help="folder: derived stores, runs, weights and ensemble.yaml")],
    only: Annotated[Optional[list[str]], typer.Option("--only", help="train just this specialist (repeatable)")] = None,
    generalist_spec: Annotated[Optional[Path], typer.Option(help="the generalist's model spec (YAML/JSON; default: "
                                                            "the generalist store's one teacher)")] = None,
    epochs: Annotated[int, typer.Option()] = 30,
    batch_size: Annotated[int, typer.Option()] = 128,
    lr: Annotated[float, typer.Option()] = 1e-3,
    alpha: Annotated[float, typer.Option(help="weight of the generalist's soft targets (the regulariser); 0: hard "
                                         "labels only, as the paper trains specialists")] = 0.5,
    temperature: Annotated[float, typer.Option(help="T of the soft term (exact at 1)")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    checkpoint_every: Annotated[int, typer.Option(help="also checkpoint every N steps")] = 0,
    parallel: Annotated[int, typer.Option(help="specialists trained at once, each in its own process")] = 1,
    allow_code: Annotated[bool, typer.Option("--allow-code", help="allow code-carrying models and data factories", metavar="")] = False,
):
    """Train each planned specialist from the generalist (initialised from its weights, on a derived store with
    its classes oversampled to about half, the dustbin corrected afterwards); resumable: run it again to go on.
    Writes OUT/ensemble.yaml for `generate --combine specialists`."""
    import yaml

    from darkstore.models import ModelSpec
    from darkstore.specfile import load_spec_file
    from storage import open_store
    from student_trainer.specialists import correct_dustbin, derive_store, ensemble_doc, init_weights
    from student_trainer.train import TrainConfig, train as run_train

    doc = load_spec_file(plan)
    gen = open_store(doc["generalist_store"])
    if generalist_spec is not None:
        g_spec = ModelSpec.from_file(generalist_spec)
    elif len(gen.meta.teachers) == 1:
        g_spec = ModelSpec.model_validate(gen.meta.teachers[0].spec)
    else:
        raise typer.BadParameter(f"{gen.path} has {len(gen.meta.teachers)} teachers: name the generalist's model "
                                 "with --generalist-spec")
    todo = [sp for sp in doc["specialists"] if not only or sp["name"] in only]
    if only and len(todo) != len(set(only)):
        raise typer.BadParameter(f"--only names a specialist the plan does not have ({', '.join(sorted(only))})")
    if parallel > 1 and len(todo) > 1:
        _specialists_in_processes([sp["name"] for sp in todo], parallel, out_ / "logs")  # then found finished
    trained = {}
    for sp in todo:
        name, classes = sp["name"], sp["classes"]
        store = derive_store(gen, classes, out_ / "stores" / name, seed=seed)
        rec = store.meta.specialist_of
        init = out_ / "init" / f"{name}.safetensors"
        spec = init_weights(g_spec, gen.meta.num_classes, classes, init, allow_code=allow_code)
        cfg = TrainConfig(student=spec, epochs=epochs, batch_size=batch_size, lr=lr, alpha=alpha,
                          temperature=temperature, seed=seed, device=device, checkpoint_every=checkpoint_every)
        console.print(f"{name}: {len(classes)} classes + dustbin, {store.meta.num_rows} rows "
                      f"({rec.subset_fraction:.1%} of the generalist's rows are its classes, repeated {rec.repeat}x)",
                      highlight=False)
        r = run_train(cfg, store, out_ / "runs" / name, resume=True, allow_code=allow_code,
                      log=lambda m, name=name: console.print(f"{name}: {m}", highlight=False))
        weights = correct_dustbin(spec, out_ / "runs" / name / "student.safetensors", rec.repeat,
                                  out_ / f"{name}.safetensors", allow_code=allow_code)
        trained[name] = (spec.model_copy(update={"weights": str(weights.resolve())}), classes)
        acc = r.final.get("accuracy")
        console.print(f"{name}: trained{' (already)' if r.already_finished else ''}; held-out accuracy on its "
                      f"classes + dustbin {acc:.4f}" if acc is not None else f"{name}: trained", highlight=False)
    if not only:
        ens = ensemble_doc(g_spec, trained, gen.meta.num_classes, gen.meta.class_names)
        (out_ / "ensemble.yaml").write_text(yaml.safe_dump(ens, sort_keys=False))
        console.print(f"ensemble for `generate --combine specialists`: {out_ / 'ensemble.yaml'}")


def _specialists_in_processes(names: list[str], parallel: int, logs: Path) -> None:
    """Run this command once per specialist (``--only NAME``, its output in ``logs/NAME.log``), ``parallel`` at a
    time, each with its share of the cores; a failure is reported by name and stops the rest from starting."""
    import os
    import subprocess

    argv, skip = [], False
    for a in sys.argv[1:]:  # this invocation's arguments, minus --parallel
        if skip:
            skip = False
        elif a == "--parallel":
            skip = True
        elif not a.startswith("--parallel="):
            argv.append(a)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
    logs.mkdir(parents=True, exist_ok=True)
    waiting, running, failed = list(names), {}, []
    while waiting or running:
        while waiting and len(running) < parallel and not failed:
            name = waiting.pop(0)
            with (logs / f"{name}.log").open("w") as log:
                running[name] = subprocess.Popen([sys.executable, "-m", "darkstore_app.cli", *argv, "--only", name],
                                                 env=env, stdout=log, stderr=subprocess.STDOUT)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    failed.append(name)
                    tail = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    console.print(f"[red]failed[/] {name}: {escape(' '.join(tail))} (log: {logs / f'{name}.log'})",
                                  highlight=False)
                else:
                    console.print(f"{name}: trained (in its own process)", highlight=False)
        if running:
            time.sleep(0.2)
        if failed and not running:
            raise typer.Exit(1)


# --- inspect ---------------------------------------------------------------------
@app.command(cls=_Command)
def inspect(
    store: Annotated[str, typer.Argument(help="store: a directory, file:///… or s3://bucket/prefix")],
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON", metavar="")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="also read every committed row and check it", metavar="")] = False,
):
    """Describe a store: shape, size, teachers, combine rule, completeness, accuracies."""
    from storage import open_store

    reader = open_store(store, allow_incomplete=True)
    if verify:
        reader.verify()
    s = reader.summary()
    if as_json:
        out.print_json(json.dumps(s))
        return
    t = Table(title=f"darkstore store {s['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    state = "[green]complete[/]" if s["complete"] else f"[yellow]incomplete[/] ({s['chunks_done']}/{s['chunks']} chunks)"
    t.add_row("state", state + (" (verified)" if verify else ""))
    seq = s["sequence"]
    if seq:
        tok = seq["tokenizer"]
        step = (s.get("targets_record") or {}).get("step")
        values = (f"uint8 steps of {step:g} nat below each position's largest (off by ≤ {step / 2:g})" if step
                  else s["dtype"]) + f", {s['values']}"
        t.add_row("targets", f"{s['targets']} of {s['classes']:,} tokens per position, {seq['length']} positions per "
                  f"row; values {values}; chunks of {s['chunk_rows']} rows, {s['compressor']}")
        t.add_row("sequences", f"{s['rows']:,} rows ({seq['packing']}), {seq['positions']:,} positions with a loss, "
                  f"from {_human(seq['text_bytes'])} of text; tokenizer {tok['path']} ({tok['vocab_size']:,} tokens, "
                  f"fingerprint {tok['fingerprint'][:16]}…)")
    elif s["targets"] == "dense":
        t.add_row("logits", f"[{s['rows']}, {s['classes']}] {s['dtype']}, chunks of {s['chunk_rows']} rows, "
                  f"{s['compressor']}")
    else:
        t.add_row("targets", f"{s['targets']} of {s['classes']} classes per row, {s['dtype']}, chunks of "
                  f"{s['chunk_rows']} rows, {s['compressor']}")
    if s["keep_members"]:
        t.add_row("members", f"[{len(s['teachers'])}, {s['rows']}, {s['classes']}] {s['dtype']}")
    for f in s.get("features", ()):
        t.add_row(f"features {f['name']}", f"{' × '.join(map(str, f['shape']))} {s['dtype']} per row "
                  f"({f['raw_bytes_per_row']:,} B uncompressed), reduction: {f['reduction']}")
    if s["views_per_sample"] > 1 or s["augment"]:
        ops = ", ".join(o["op"] for o in s["augment"]["ops"])
        t.add_row("views", f"{s['views_per_sample']} per sample ({s['samples']} samples × {s['views_per_sample']} = "
                  f"{s['rows']} rows; view 0 {'clean' if s['augment']['clean_view0'] else 'augmented'}); ops: {ops}; "
                  f"{len(s['view_params'])} recorded parameters per row (float64)")
    if seq:
        per = seq["length"]
        t.add_row("size on disk", f"{_human(s['disk_bytes'])} ({s['bytes_per_row'] / per:.1f} B/token; "
                  f"uncompressed {s['raw_bytes_per_row'] / per:.1f} B/token)")
    else:
        t.add_row("size on disk", f"{_human(s['disk_bytes'])} ({s['bytes_per_sample']:.1f} B/sample, "
                  f"{s['bytes_per_row']:.1f} B/row; uncompressed {s['raw_bytes_per_sample']} B/sample, "
                  f"{s['raw_bytes_per_row']} B/row)")
    if s.get("specialists"):
        sp = s["specialists"]
        covered = len({k for x in sp["specialists"] for k in x["classes"]})
        t.add_row("combine", f"specialists: {sp['generalist']} + {len(sp['specialists'])} specialists over {covered} "
                  f"classes, active when they meet the generalist's top {sp['top_n']} (exact at T=1)")
    else:
        t.add_row("combine", f"{s['combine']} mean, generation T={s['temperature']:g}")
    if s.get("specialist_of"):
        so = s["specialist_of"]
        t.add_row("specialist of", f"{so['generalist_store']}: classes {so['classes']} + dustbin, their rows "
                  f"repeated {so['repeat']}x ({so['subset_fraction']:.1%} before)")
    ts = s["transfer_set"]
    t.add_row("transfer set", f"{ts['spec'].get('kind')} {ts['spec'].get('path') or ts['spec'].get('root') or ts['spec'].get('name') or ''}"
              f" — {ts['num_samples']} samples, fingerprint {ts['fingerprint'][:16]}…")
    acc, ppl = s["accuracy"] or {}, s["perplexity"] or {}
    stride = (s.get("sequence") or {}).get("teacher_stride", 1)
    for tr in s["teachers"]:
        a = f", accuracy {100 * acc[tr['name']]:.2f} %" if tr["name"] in acc else ""
        if tr["name"] in ppl:
            a = (f", perplexity {ppl[tr['name']]:,.2f}, top-1 {100 * acc[tr['name']]:.2f} %"
                 + (f" (on one position in {stride})" if stride > 1 else ""))
        h = tr["sha256"][:16] + "…" if tr["sha256"] else "-"
        t.add_row(f"teacher {tr['name']}", f"{tr['arch']} ({tr['format']}), {tr['num_params']:,} params, sha256 {h}{a}")
    if ppl:
        t.add_row("ensemble", f"perplexity {ppl['ensemble']:,.2f}, top-1 {100 * acc['ensemble']:.2f} % on "
                  f"{acc['labeled_rows']:,} positions")
    elif acc:
        t.add_row("ensemble accuracy", f"{100 * acc['ensemble']:.2f} % on {acc['labeled_rows']} labeled rows")
    t.add_row("job key", s["job_key"][:16] + "…")
    t.add_row("created", f"{s['created_at']} by darkstore {s['software_version']}")
    out.print(t)


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
def train(
    out_: Annotated[Path, typer.Option("--out", help="run directory")],
    store: Annotated[Optional[str], typer.Option(help="store to distill from (a directory or URL)")] = None,
    job: Annotated[Optional[Path], typer.Option(help="instead of --store: submit this job spec to the service (a known "
                                                 "job is not rerun), wait for it, train from its store")] = None,
    student: Annotated[Optional[str], typer.Option(help="student architecture (see `darkstore archs`)")] = None,
    arch_kwargs: Annotated[str, typer.Option(help="JSON keyword arguments for the architecture")] = "{}",
    student_spec: Annotated[Optional[Path], typer.Option(help="student model spec file (YAML/JSON) instead of --student")] = None,
    data: Annotated[Optional[str], typer.Option(help="transfer set (default: the one recorded in the store)")] = None,
    eval_store: Annotated[Optional[str], typer.Option(help="store over a held-out set to evaluate on (a directory or URL)")] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="inputs of --eval-store (default: as recorded)")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="distillation temperature T (default: 4 for "
                                                         "classes; 1 for a language model's store, or the T a "
                                                         "sampled store was drawn at)")] = None,
    alpha: Annotated[float, typer.Option(help="weight of the soft term (0 = hard labels only)")] = 0.9,
    loss: Annotated[str, typer.Option("--loss", "--objective", help="kl (Hinton's KD) | mse (logit matching, "
                                      "dense stores) | ce (hard labels only) | hint (FitNets: --hint-epochs "
                                      "guiding --student-layer, then --epochs of kl) | reverse_kl | jsd "
                                      "(language models' stores)")] = "kl",
    hint_layer: Annotated[Optional[str], typer.Option(help="hint: the store's teacher layer, TEACHER:LAYER "
                                                      "(default: its only one)")] = None,
    student_layer: Annotated[Optional[str], typer.Option(help="hint: the student module it guides (e.g. "
                                                         "features.3; `darkstore archs --layers ARCH` lists them)")] = None,
    hint_epochs: Annotated[int, typer.Option(help="hint: epochs of the hint stage, before --epochs of KD")] = 0,
    epochs: Annotated[int, typer.Option()] = 30,
    batch_size: Annotated[int, typer.Option()] = 128,
    lr: Annotated[float, typer.Option()] = 1e-3,
    weight_decay: Annotated[float, typer.Option()] = 0.0,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd")] = "adamw",
    schedule: Annotated[str, typer.Option(help="learning-rate schedule: cosine | linear | step | constant")] = "cosine",
    warmup: Annotated[float, typer.Option(help="fraction of the steps spent warming the learning rate up")] = 0.0,
    amp: Annotated[str, typer.Option(help="mixed precision: off | bf16 | fp16 (fp16 needs CUDA)")] = "off",
    seed: Annotated[int, typer.Option()] = 0,
    holdout: Annotated[float, typer.Option(help="fraction of rows held out when no --eval-store")] = 0.1,
    shuffle_buffer_mb: Annotated[float, typer.Option(help="MiB of targets shuffled together (a small store "
                                                     "shuffles whole); the trainer reports how well batches mix")] = 256.0,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's own choice)")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N (under torchrun: each rank its own GPU)")] = "cpu",
    num_workers: Annotated[int, typer.Option(help="DataLoader processes streaming the store")] = 0,
    views_per_epoch: Annotated[Optional[int], typer.Option(help="views store: this many random views of each sample per epoch (default: all K)")] = None,
    view_targets: Annotated[str, typer.Option(help="views store: matched (each view's own targets) | clean (its sample's clean-view targets: the stale-target ablation)")] = "matched",
    topk_loss: Annotated[str, typer.Option(help="top-k store: bucket (KL over the head and one 'other' bucket) | spread (the tail spread evenly, then the dense KL)")] = "bucket",
    checkpoint_every: Annotated[int, typer.Option(help="checkpoint every N steps too (0: at epoch ends only)")] = 0,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="deterministic algorithms only (bit-exact reruns)", metavar="")] = False,
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
):
    """Train one student against the store's soft targets; saves safetensors + metrics."""
    from darkstore.data import open_transfer_set
    from student_trainer.train import TrainConfig, train as run

    spec = _student_spec(student_spec, student, arch_kwargs)
    if (store is None) == (job is None):
        raise typer.BadParameter("give --store STORE or --job SPEC (one of them)")
    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if job is not None:
        store = _store_of_job(job, api, token, job_timeout)
    if temperature is None:
        from student_trainer.config import store_temperature

        temperature = store_temperature(store) or 4.0
    cfg = TrainConfig(student=spec, temperature=temperature, alpha=alpha, loss=loss, epochs=epochs,
                      hint_layer=hint_layer, student_layer=student_layer, hint_epochs=hint_epochs,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer, seed=seed,
                      holdout=holdout, device=device, num_workers=num_workers, schedule=schedule, warmup=warmup,
                      amp=amp, checkpoint_every=checkpoint_every, deterministic=deterministic,
                      views_per_epoch=views_per_epoch, view_targets=view_targets, topk_loss=topk_loss,
                      shuffle_buffer_mb=shuffle_buffer_mb, threads=threads)
    import os

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
            r = run(cfg, store, out_, data=tset, eval_store=eval_store, eval_data=etset,
                    allow_incomplete=allow_incomplete, allow_code=allow_code, resume=resume, overwrite=overwrite,
                    latency=latency, on_epoch=on_epoch, log=lambda m: console.print(m), fingerprints=fps,
                    track=track or (), cache_dir=_cache())
        except KeyboardInterrupt:
            raise _train_interrupted(out_, int(_task(progress, task).completed), checkpoint_every) from None
    if not rank0:
        return
    _print_run(r)


def _student_spec(student_spec: Optional[Path], student: Optional[str], arch_kwargs: Optional[str]):
    """The student `train` builds: a spec file, or an architecture with its JSON arguments."""
    from darkstore.models import ModelSpec

    if student_spec is not None:
        return ModelSpec.from_file(student_spec)
    if student is not None:
        return ModelSpec(arch=student, arch_kwargs=_json_option(arch_kwargs, "--arch-kwargs"))
    raise typer.BadParameter("give --student ARCH or --student-spec FILE")


def _train_interrupted(out_: str, epochs: int, checkpoint_every: int) -> "Interrupted":
    """What Ctrl-C in `train` kept, and the command that continues."""
    kept = f"its checkpoint after epoch {epochs}" if epochs else "no finished epoch yet"
    every = f" (or a later one: --checkpoint-every {checkpoint_every})" if checkpoint_every else ""
    return Interrupted(f"{out_} keeps {kept}{every}; continue with: "
                       f"{_again(add='--resume', drop=('--overwrite',))}")


class Interrupted(DarkstoreError):
    """Ctrl-C: the message says what was kept and the command that continues."""


def _again(add: str | None = None, drop: tuple[str, ...] = ()) -> str:
    """The command line this process was started with, to run again (``add`` a flag, ``drop`` some)."""
    import shlex

    args = [a for a in sys.argv[1:] if a not in drop]
    return shlex.join(["darkstore", *args, *([add] if add and add not in args else [])])


def _epoch_rate(row: dict) -> str:
    if row.get("eval_perplexity") is not None:  # a language model
        return f"loss {row['train_loss']:.4f} ppl {row['eval_perplexity']:.2f}"
    acc = row.get("eval_accuracy")
    return f"loss {row['train_loss']:.4f}" + (f" acc {acc:.4f}" if acc is not None else "")


def _print_run(r) -> None:
    """What a finished `train` says: where the student went and how it did on the held-out rows."""
    f = r.final
    if r.already_finished:
        console.print(f"{r.out} is already finished: nothing to train")
    if not f:  # --holdout 0 and no --eval-store: nothing was held out to evaluate on
        console.print(f"[green]saved[/] {r.out / 'student.safetensors'} ({r.num_params:,} params), metrics in "
                      f"{r.out / 'metrics.jsonl'}; no held-out rows (--holdout 0, no --eval-store): not evaluated")
        return
    console.print(f"[green]saved[/] {r.out / 'student.safetensors'} ({r.num_params:,} params), metrics in "
                  f"{r.out / 'metrics.jsonl'}, evaluation in {r.out / 'eval.json'}")

    if "perplexity" in f:
        out.print(_lm_line(f))
        return

    def num(key: str) -> str:
        v = f.get(key)
        return "n/a (no labels)" if v is None or v != v else f"{v:.4f}"

    out.print(f"held-out: accuracy {num('accuracy')}  agreement {num('agreement')}  NLL {num('nll')}  "
              f"({f.get('rows', 0)} rows)")


def _lm_line(f: dict) -> str:
    """A language-model student's held-out metrics in one line, its teachers' beside them."""
    teachers = f.get("teacher_perplexity")
    line = f"held-out: perplexity {f['perplexity']:.3f}" + (f" (teachers {teachers:.3f})" if teachers else "")
    if f.get("bits_per_byte") is not None:
        line += f"  bits/byte {f['bits_per_byte']:.4f}"
    return line + f"  top-1 {f['top1']:.4f}  agreement {f['agreement']:.4f}  ({f['positions']:,} positions)"


# --- many students: sweep, eval, export, report -------------------------------------
def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


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
    verify_data: VerifyData = Verify.quick,
    track: Track = None,
):
    """Train every grid point (points that differ only in per-student settings together, from one read of the
    store; the rest in parallel processes); finished points are skipped; writes mean ± std over seeds. A grid
    file with a job: fills its store from that job first (resumable)."""
    from student_trainer.config import unused_settings
    from student_trainer.sweep import GridSpec, markdown_table, points, run_sweep

    spec = GridSpec.from_file(grid)
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
    from student_trainer.evaluate import evaluate_run

    rep = evaluate_run(run, store=store, device=device, latency=not no_latency, allow_code=allow_code,
                       fingerprints=_fingerprints(verify_data), cache_dir=_cache())
    if as_json:
        out.print_json(json.dumps(rep))
        return
    if "perplexity" in rep["metrics"]:
        _print_lm_eval(run, rep)
    else:
        _print_class_eval(run, rep)
    if rep.get("note"):
        console.print(f"[yellow]note[/]: {rep['note']}")
    if store is None:
        console.print(f"written to {run / 'eval.json'}")


def _print_lm_eval(run: Path, rep: dict) -> None:
    m, tm, comp = rep["metrics"], rep["teacher_metrics"], rep["compression"]
    st, te = comp["student"], comp["teachers"]
    out.print(f"{run}: {rep['positions']:,} positions in {rep['rows']} rows of {rep['store']}", highlight=False)
    t = Table()
    for col in ("", "student", "teacher ensemble"):
        t.add_column(col, justify="right" if col else "left")

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
    t = Table()
    for col in ("", "student", "teacher ensemble"):
        t.add_column(col, justify="right" if col else "left")
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
    from student_trainer.export import export_run

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
):
    """Write a ready-to-submit example into a data root: digits, trained teachers, job.yaml, student.yaml (or,
    with --lm, a language-model job)."""
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


# --- service ---------------------------------------------------------------------
def _settings(**overrides):
    from teacher_service.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None and v != []})


@app.command(cls=_Command)
def serve(
    local: Annotated[bool, typer.Option("--local", help="run jobs in this process (no Redis): the embedded default", metavar="")] = False,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    home: Annotated[Optional[Path], typer.Option(help="job records and stores [env DARKSTORE_HOME]")] = None,
    data_root: Annotated[Optional[list[Path]], typer.Option("--data-root", help="allowed data root (repeatable) [env DARKSTORE_DATA_ROOTS]")] = None,
    broker: Annotated[Optional[str], typer.Option(help="Redis URL [env DARKSTORE_BROKER_URL]")] = None,
    allow_code: Annotated[Optional[bool], typer.Option("--allow-code/--no-allow-code", help="allow code-carrying teachers/data [env DARKSTORE_ALLOW_CODE]", metavar="")] = None,
    device: Annotated[Optional[str], typer.Option(help="device of the local runner [env DARKSTORE_DEVICE]")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
):
    """Serve the HTTP job API (uvicorn). With a broker configured jobs go to Celery workers; without one (or with
    --local) they run in this process."""
    import logging

    import uvicorn

    from teacher_service.api import create_app

    s = _settings(home=home, data_roots=data_root, broker_url=broker, allow_code=allow_code, device=device,
                  mode="local" if local else None)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = "in-process runner" if not s.use_celery else f"Celery via {s.redacted()['broker_url']}"
    console.print(f"darkstore API on http://{host}:{port} — jobs: {engine}; home {s.home.resolve()}; "
                  f"data roots {', '.join(map(str, s.roots))}" + ("; bearer token required" if s.token else ""))
    if not s.token and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning[/]: listening on {host} with no token: anyone who reaches this address can "
                      "submit jobs; set DARKSTORE_TOKEN (docker compose publishes the port on 127.0.0.1 only "
                      "unless DARKSTORE_BIND says otherwise)")
    uvicorn.run(create_app(s), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


@app.command(cls=_Command)
def worker(
    concurrency: Annotated[int, typer.Option(help="worker processes (one per GPU is typical)")] = 1,
    broker: Annotated[Optional[str], typer.Option(help="Redis URL [env DARKSTORE_BROKER_URL]")] = None,
    home: Annotated[Optional[Path], typer.Option(help="shared job records and stores [env DARKSTORE_HOME]")] = None,
    hostname: Annotated[Optional[str], typer.Option(help="Celery node name (default worker@<host>, with a pid suffix)")] = None,
    pool: Annotated[str, typer.Option(help="prefork | solo | threads")] = "prefork",
    log_level: Annotated[str, typer.Option()] = "info",
):
    """Run a Celery worker that takes chunk-range tasks of any job (needs DARKSTORE_BROKER_URL)."""
    import os
    import socket

    for env, value in (("DARKSTORE_BROKER_URL", broker), ("DARKSTORE_HOME", home)):
        if value is not None:
            os.environ[env] = str(value)
    s = _settings()
    if not s.broker_url:
        raise typer.BadParameter("a worker needs a broker: --broker redis://HOST:6379/0 or DARKSTORE_BROKER_URL")
    from teacher_service.celery_app import QUEUE, app as celery

    name = hostname or f"worker-{os.getpid()}@{socket.gethostname()}"
    console.print(f"darkstore worker {name}: {concurrency} process(es), queue {QUEUE!r}, device {s.device}, "
                  f"home {s.home.resolve()}")
    celery.worker_main(["worker", f"--loglevel={log_level.upper()}", f"--concurrency={concurrency}", "-Q", QUEUE,
                        "-n", name, f"--pool={pool}", "--without-gossip", "--without-mingle"])


@app.command("worker-ping", cls=_Command)
def worker_ping(
    timeout: Annotated[float, typer.Option(help="seconds to wait for answers")] = 5.0,
    broker: Annotated[Optional[str], typer.Option(help="Redis URL [env DARKSTORE_BROKER_URL]")] = None,
    any_host: Annotated[bool, typer.Option("--any-host", help="any worker answering will do (default: one on this "
                                           "host, as a container's health check wants)", metavar="")] = False,
):
    """Exit 0 when a worker (on this host) answers a ping through the broker: the worker's health check."""
    import socket

    s = _settings(broker_url=broker)
    if not s.broker_url:
        raise typer.BadParameter("no broker: --broker redis://HOST:6379/0 or DARKSTORE_BROKER_URL")
    from teacher_service.celery_app import make_celery

    celery = make_celery(s)
    host = socket.gethostname()
    try:
        replies = celery.control.ping(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 — the broker is down: unhealthy, said in one line
        console.print(f"[red]unhealthy[/]: cannot reach the broker {s.broker_url} ({type(exc).__name__}: {exc})")
        raise typer.Exit(1)
    names = [name for reply in replies for name in reply]
    mine = names if any_host else [n for n in names if n.endswith("@" + host)]
    if not mine:
        console.print(f"[red]unhealthy[/]: no worker {'' if any_host else f'on {host} '}answered within {timeout:g} s"
                      + (f" (others did: {', '.join(names)})" if names else ""))
        raise typer.Exit(1)
    out.print(", ".join(mine))


def _data_root(given: Optional[Path]) -> Optional[Path]:
    """Where the service's first data root is, as seen from here: given, else DARKSTORE_DATA_ROOTS's first."""
    if given is not None:
        return given
    roots = _settings().data_roots
    return roots[0] if roots else None


def _as_served(path: Path, root: Path) -> str:
    """A path given here (relative to the working directory) as the service resolves it: relative to its data
    root when it lies inside, else absolute (the service then checks it against its roots)."""
    where, root = path.expanduser().resolve(), root.expanduser().resolve()
    return str(where.relative_to(root)) if where.is_relative_to(root) else str(where)


def _client(api: Optional[str], token: Optional[str]):
    from teacher_service.client import DarkstoreClient

    return DarkstoreClient(api, token)


Api = Annotated[Optional[str], typer.Option("--api", help="API base URL [env DARKSTORE_API_URL]")]
Token = Annotated[Optional[str], typer.Option("--token", help="bearer token [env DARKSTORE_TOKEN]")]


def _state_style(state: str) -> str:
    return {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}.get(state, "white")


def _job_line(v) -> str:
    p = v.progress
    rate = f", {v.rows_per_second:,.0f} rows/s" if v.rows_per_second else ""
    eta = f", ETA {v.eta_seconds:.0f} s" if v.eta_seconds is not None else ""
    total = p.rows_total if p.rows_total is not None else "?"
    return (f"job {v.id} [{_state_style(v.state)}]{v.state}[/]: {p.rows_done}/{total} rows, "
            f"{p.chunks_done}/{p.chunks_total or '?'} chunks{rate}{eta}")


@app.command(cls=_Command)
def submit(
    spec: Annotated[Path, typer.Argument(help="job spec file (YAML/JSON); its relative paths are relative to the "
                                         "file that holds them, as for generate")],
    data_root: Annotated[Optional[Path], typer.Option(help="the service's data root as seen from here: paths are "
                                                      "sent relative to it [default: DARKSTORE_DATA_ROOTS's first, "
                                                      "else the job file's folder]")] = None,
    adopt: Annotated[Optional[Path], typer.Option(help="a store `darkstore generate` already made for this job, "
                                                  "inside the data root: verified and taken as the job's store "
                                                  "instead of running the teachers again")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job, with a progress bar", metavar="")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="seconds to wait at most")] = None,
    api: Api = None,
    token: Token = None,
):
    """Submit a teacher job to the service. The same job submitted twice returns the first one."""
    root = _data_root(data_root)
    with _client(api, token) as c:
        sub = c.submit(spec, data_root=root, adopt=_as_served(adopt, root or spec.parent) if adopt else None)
        view, created = sub.job, sub.created
        console.print(("submitted new " if created else "already known: ") + _job_line(view), highlight=False)
        out.print(view.id)
        if wait and view.state in ("queued", "running"):
            with _progress() as progress:
                task = progress.add_task(f"job {view.id[:8]}", total=view.progress.rows_total,
                                         completed=view.progress.rows_done, rate="")

                def show(v):
                    rate = f"{v.rows_per_second:,.0f} rows/s" if v.rows_per_second else v.state
                    progress.update(task, total=v.progress.rows_total, completed=v.progress.rows_done, rate=rate)

                view = c.wait(view.id, timeout=timeout, on_progress=show)
            console.print(_job_line(view), highlight=False)
        if view.state in ("failed", "cancelled"):
            if view.error:
                console.print(f"[red]error:[/] {escape(view.error)}", highlight=False)
            raise typer.Exit(1)
        if wait:
            console.print(f"store: {view.store}")


@app.command(cls=_Command)
def jobs(
    job_id: Annotated[Optional[str], typer.Argument(help="show one job in full")] = None,
    state: Annotated[Optional[str], typer.Option(help="queued | running | succeeded | failed | cancelled")] = None,
    limit: Annotated[int, typer.Option()] = 50,
    offset: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", metavar="")] = False,
    api: Api = None,
    token: Token = None,
):
    """List the service's jobs (newest first), or show one."""
    with _client(api, token) as c:
        if job_id:
            v = c.job(job_id)
            if as_json:
                out.print_json(v.model_dump_json())
                return
            out.print(_job_line(v), highlight=False)
            out.print(f"store {v.store}\ncreated {v.created_at}, started {v.started_at}, finished {v.finished_at}, "
                      f"attempt {v.attempt}" + (f"\nerror: {escape(v.error)}" if v.error else ""), highlight=False)
            return
        page = c.jobs(state, limit, offset)
        items, total = page.items, page.total
        if as_json:
            out.print_json(page.model_dump_json())
            return
        t = Table(title=f"{total} job(s)" + (f" {state}" if state else ""), title_justify="left")
        t.add_column("id", no_wrap=True)
        for col in ("state", "rows", "chunks", "rows/s", "created", "error"):
            t.add_column(col, no_wrap=col != "error")
        for v in items:
            p = v.progress
            t.add_row(v.id, f"[{_state_style(v.state)}]{v.state}[/]", f"{p.rows_done}/{p.rows_total or '?'}",
                      f"{p.chunks_done}/{p.chunks_total or '?'}",
                      f"{v.rows_per_second:,.0f}" if v.rows_per_second else "", v.created_at[:19].replace("T", " "),
                      escape((v.error or "")[:60]))
        out.print(t)


@app.command(cls=_Command)
def cancel(job_id: Annotated[str, typer.Argument()], api: Api = None, token: Token = None):
    """Cancel a job: it stops after the chunk in progress; committed chunks stay."""
    with _client(api, token) as c:
        out.print(_job_line(c.cancel(job_id)), highlight=False)


@app.command(cls=_Command)
def resume(job_id: Annotated[str, typer.Argument()], api: Api = None, token: Token = None):
    """Resume a cancelled or failed job from its committed chunks."""
    with _client(api, token) as c:
        out.print(_job_line(c.resume(job_id)), highlight=False)


def _error(message: str, code: int = 2) -> None:
    """One line on stderr, whatever the message holds (newlines folded), then exit."""
    console.print("[red]error:[/]", escape(" ".join(message.split())), highlight=False)
    sys.exit(code)


def _json_option(value: str | None, option: str) -> dict:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{option} is not valid JSON ({exc.msg} at character {exc.pos}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise SpecError(f"{option} must be a JSON object, got {value!r}")
    return parsed


def main() -> None:
    """Exit codes: 0 done; 1 a job or run ended unsuccessfully (its error is printed); 2 the command could not do
    what was asked (one `error:` line says why); 130 interrupted."""
    import click

    from darkstore.paths import children_skip_working_directory

    children_skip_working_directory()
    usage_errors = tuple({click.UsageError, typer.BadParameter.__base__})  # typer may vendor its own click
    exits, aborts = tuple({click.exceptions.Exit, typer.Exit}), (click.Abort, typer.Abort, KeyboardInterrupt)
    try:
        code = app(standalone_mode=False)
    except Interrupted as exc:
        console.print(f"[yellow]interrupted[/]: {exc}", highlight=False)
        sys.exit(130)
    except DarkstoreError as exc:
        _error(str(exc))
    except ValidationError as exc:
        _error("invalid spec: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
                                           for e in exc.errors()))
    except usage_errors as exc:
        if not exc.format_message():  # no arguments: the help was shown
            sys.exit(2)
        cmd = exc.ctx.command_path if exc.ctx else "darkstore"
        _error(f"{exc.format_message()} (see `{cmd} --help`)")
    except exits as exc:
        sys.exit(exc.exit_code)
    except aborts:
        code = 130
    except OSError as exc:  # a full disk, a permission, a vanished file
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or type(exc).__name__}{where}" if exc.strerror else f"{type(exc).__name__}: {exc}")
    if code == 130:  # Ctrl-C in a command that says nothing more itself (typer returns 130 for it)
        console.print("[yellow]interrupted[/]: what was finished is kept; rerun the same command to continue")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
