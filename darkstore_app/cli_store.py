"""`darkstore` commands that run teachers and read stores: `generate`, `specialists`, `inspect`."""


from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from .cli_common import (
    _again, app, _Command, console, _fingerprints, given_settings, _Group, _human, Interrupted, out, _progress,
    settings_options, _task, Verify, VerifyData,
)
from darkstore.jobsettings import JobSettings



# --- generate ---------------------------------------------------------------------
@app.command(cls=_Command)
@settings_options(JobSettings, specialist_top_n={"names": ("--top-n",)})
def generate(
    ctx: typer.Context,
    out_: Annotated[str, typer.Option("--out", help="store to create or resume: a directory, file:///…, s3://bucket/prefix")],
    teachers: Annotated[Optional[Path], typer.Option(help="ensemble spec (YAML/JSON)")] = None,
    data: Annotated[Optional[str], typer.Option(help="transfer set: spec file (YAML/JSON), .npz/.npy, or image folder")] = None,
    job: Annotated[Optional[Path], typer.Option(help="a whole job spec file instead of --teachers/--data/options")] = None,
    targets: Annotated[Optional[str], typer.Option(help="dense (default: every class) | topk:K (the K largest values "
                                                   "and the tail's mass) | sampled:K[@T] (K classes drawn per row)")] = None,
    keep_features: Annotated[Optional[list[str]], typer.Option(
        "--keep-features", help="TEACHER:LAYER — also store this teacher layer's output per row (FitNets' hints; "
        "repeat for more layers)")] = None,
    feature_pool: Annotated[Optional[int], typer.Option(help="average-pool each kept [C, H, W] layer to "
                                                        "[C, P, P]")] = None,
    feature_project: Annotated[Optional[int], typer.Option(help="then project each kept layer to D dimensions "
                                                           "(a fixed seeded Gaussian matrix)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="rows per forward pass (default: 256 rows of classes; "
                                                      "token rows of about 8,192 positions)")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="DataLoader processes decoding inputs (default: none for "
                                                       "arrays files, else up to 8; half the cores on the CPU)")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="run conv teachers in channels-last memory format", metavar="")] = False,
    writer_processes: Annotated[Optional[bool], typer.Option("--writer-processes/--writer-threads", help="store writes in "
                                                             "forked processes or threads (default: processes on CUDA)", metavar="")] = None,
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
    **settings,  # the job's settings, one option each (JobSettings' fields): a --job file's, unless given here
):
    """Run the teacher ensemble over the transfer set into a chunked Zarr store (resumable)."""
    from teacher_service.generate import Shard

    part = Shard.parse(shard) if shard is not None else None
    spec = _job_spec(job, teachers, data, given_settings(ctx, JobSettings) if job else settings, augment=augment,
                     views=views, targets=targets, keep_features=keep_features, feature_pool=feature_pool,
                     feature_project=feature_project)
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
        self.writer, self.counts_written, self.written0 = None, False, 0

    def start(self, writer, chunks) -> None:
        meta, part = writer.meta, self.part
        self.unit, self.per, self.counts_written = meta.kind.progress(meta)
        self.writer = writer
        self.written0 = self._written()
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

    def _written(self) -> int:
        """Tokens written into the committed chunks (responses stores)."""
        if not self.counts_written:
            return 0
        return int(self.writer.group["stats"][:][self.writer.done_mask()][:, 0].sum())

    def rows(self, n: int) -> None:
        self.n += n
        n *= self.per
        seconds = max(1e-9, time.perf_counter() - self.t)
        rate = self.n * self.per / seconds
        said = f"{rate:,.1f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"
        if self.counts_written:
            written = self._written()
            said += f", {written:,} tokens written, {(written - self.written0) / seconds:,.0f} tokens/s"
        self.progress.update(self.id, advance=n, rate=said)
        if not self.progress.disable:
            return
        t = _task(self.progress, self.id)  # a log file, CI, a notebook: no bar, so a line every tenth
        tenth = int(10 * t.completed / max(1, t.total))
        if tenth > (self.said if self.said is not None else int(10 * (t.completed - n) / max(1, t.total))):
            self.said = tenth
            console.print(f"{t.description}: {int(t.completed):,} of {int(t.total):,} {self.unit} "
                          f"({100 * t.completed / max(1, t.total):.0f} %), {said}", highlight=False)


def _job_spec(job: Optional[Path], teachers: Optional[Path], data: Optional[str], settings: dict, *,
              augment: Optional[str], views: Optional[int], targets: Optional[str],
              keep_features: Optional[list[str]], feature_pool: Optional[int], feature_project: Optional[int]):
    """The job `generate` runs: a job file with the settings given on the command line over its own, or
    --teachers/--data with the settings; then the options that refine either (views, targets, kept features)."""
    from darkstore.data import parse_data_spec
    from teacher_service.spec import EnsembleSpec, JobSpec

    if job is not None:
        spec = JobSpec.from_file(job)
        if settings:
            spec = JobSpec.model_validate({**spec.model_dump(), **settings})
    else:
        if teachers is None or data is None:
            raise typer.BadParameter("give --teachers and --data, or --job")
        spec = JobSpec.model_validate({"teachers": EnsembleSpec.from_file(teachers), "data": parse_data_spec(data),
                                       **settings})
    if augment is not None or views is not None:
        spec = spec.model_copy(update={"augment": _augment_spec(augment, views, spec.augment)})
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
    from student_trainer.train import Sources, TrainConfig, train as run_train

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
        r = run_train(cfg, Sources(store, allow_code=allow_code), out_ / "runs" / name, resume=True,
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
    examples: Annotated[int, typer.Option("--examples", min=0, help="a token store: show this many rows as text, "
                                          "what carries a loss marked (and why a written response ended)")] = 2,
):
    """Describe a store: shape, size, teachers, combine rule, completeness, accuracies."""
    from storage import open_store

    reader = open_store(store, allow_incomplete=True)
    if verify:
        reader.verify()
    s = reader.summary()
    shown = reader.meta.kind.examples(reader, examples)
    if as_json:
        out.print_json(json.dumps({**s, "examples": shown}))
        return
    t = Table(title=f"darkstore store {s['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    state = "[green]complete[/]" if s["complete"] else f"[yellow]incomplete[/] ({s['chunks_done']}/{s['chunks']} chunks)"
    t.add_row("state", state + (" (verified)" if verify else ""))
    kind = reader.meta.kind
    for label, text in kind.describe(s, _human):
        t.add_row(label, text)
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
    t.add_row("size on disk", kind.size_line(s, _human))
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
    for tr in s["teachers"]:
        a = kind.teacher_line(s, tr["name"])
        h = tr["sha256"][:16] + "…" if tr["sha256"] else "-"
        what = ("served by an engine" if tr["format"] == "engine" else
                f"{tr['arch']} ({tr['format']}), {tr['num_params']:,} params")
        t.add_row(f"teacher {tr['name']}", f"{what}, sha256 {h}{a}")
    if kind.ensemble_line(s):
        t.add_row(*kind.ensemble_line(s))
    t.add_row("job key", s["job_key"][:16] + "…")
    t.add_row("created", f"{s['created_at']} by darkstore {s['software_version']}")
    out.print(t)
    _examples(reader.meta, shown)


def _examples(meta, shown: list[dict]) -> None:
    """Rows of a token store as text: what carries a loss in green between ⟦ and ⟧."""
    if not shown:
        return
    from rich.markup import escape

    from darkstore.errors import DarkstoreError
    from darkstore.text import load_tokenizer, render_row

    path = meta.sequence.tokenizer.path
    try:
        tok = load_tokenizer(path)
    except DarkstoreError as exc:
        out.print(f"examples not shown: the store's tokenizer cannot be read here ({exc})")
        return
    for e in shown:
        why = f", ended by {e['finish']}" if "finish" in e else ""
        out.print(f"[bold]row {e['row']}[/] (sample {e['index']}{why}); what carries a loss is in [green]⟦…⟧[/]:")
        out.print("".join(f"[green]⟦{escape(text)}⟧[/]" if on else escape(text)
                          for text, on in render_row(tok, e["tokens"], e["loss_mask"])), highlight=False)
