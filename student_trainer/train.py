"""Train students against a store's cached soft targets: :func:`train` (one) and :func:`train_many` (several
from one read of the store).

A run directory (:mod:`.run_dir`) holds ``config.json`` (written first), ``checkpoint.pt`` while training,
``metrics.jsonl``, ``student.safetensors``, ``eval.json`` and last ``summary.json``: a run is finished exactly
when its summary exists. ``resume=True`` continues from the checkpoint (mid-epoch included) to the same final
weights an uninterrupted run reaches.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP and the loader is sharded across ranks;
rank 0 evaluates and writes (:mod:`.distributed`). The recipe itself is :mod:`.recipe` (classes) and
:mod:`.lm_train` (language models); students that share batches train in lockstep (:mod:`.lockstep`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


from darkstore.errors import SpecError
from darkstore.models import count_params
from storage import StoreReader
from student_trainer.errors import RunDirError

from .config import TrainConfig
from .tracking import check_trackers
from .distributed import Dist
from .lockstep import together, train_group
from .inputs import Inputs, Sources
from .recipe import Recipe
from .run_dir import RunResult, finished_run, refuse_to_replace


@dataclass
class Run:
    """One student to train: its settings and its run directory."""
    config: TrainConfig
    out: Path


def _to_train(runs: Sequence[Run], resume: bool, overwrite: bool,
              done: Callable[[int, RunResult | BaseException], None]) -> list[int]:
    """The runs still to train: a finished one (``resume``) is done as it is, a folder that holds a run without
    ``resume`` or ``overwrite`` is refused (its error is its result)."""
    todo = []
    for i, run in enumerate(runs):
        try:
            fin = finished_run(run.config, Path(run.out)) if resume else None
            if not resume and not overwrite:
                refuse_to_replace(Path(run.out))
        except RunDirError as exc:
            done(i, exc)
            continue
        if fin is not None:
            done(i, fin)
        else:
            todo.append(i)
    return todo


def train_many(
    runs: Sequence[Run],
    sources: Sources | str | Path | StoreReader,
    *,
    resume: bool = False,
    overwrite: bool = False,
    final_eval: bool = True,
    latency: bool = False,
    stack: bool | str = True,
    on_epoch: Callable[[Run, dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_done: Callable[[Run, RunResult | BaseException], None] | None = None,
    log: Callable[[Run, str], None] | None = None,
    track: Sequence[str] = (),
) -> list[RunResult | BaseException]:
    """Train several students from one store in one process: the ``sources`` (a :class:`Sources`, or a bare
    store: the store, its transfer set, the eval store and how they are opened) are opened once; students whose batches are the same (:func:`together`) train in lockstep from one read
    of each batch; the others follow one group after another. Each run writes its own directory exactly as
    :func:`train` does (``resume``: finished runs are returned as they are, interrupted ones continue;
    without it a folder that holds a run is refused with :class:`RunDirError` unless ``overwrite``).
    ``stack``: students of one architecture and optimiser in a group step as one stacked model (equal to
    training each alone within float rounding, not bit for bit; False: each steps alone, bit-identical to a
    lone run; ``"auto"``: each stack times its first steps both ways and keeps the faster,
    :class:`~student_trainer.stack.AutoStack`). ``track``: trackers each run's metrics also go to
    (:mod:`student_trainer.tracking`: ``tensorboard``).

    A student whose setup fails (a setting its store refuses) gets its exception in the result list and the
    others go on; an error while a group trains fails that group's students."""
    results: dict[int, RunResult | BaseException] = {}
    track = check_trackers(track)

    def done(i: int, res: RunResult | BaseException) -> None:
        results[i] = res
        if on_done:
            on_done(runs[i], res)

    todo = _to_train(runs, resume, overwrite, done)
    if not todo:
        return [results[i] for i in range(len(runs))]
    dist = Dist.from_env()
    if dist.on and len(runs) > 1:
        raise SpecError("under torchrun, train one student per launch")
    inputs = Inputs(Sources.of(sources))
    recipes: dict[int, Recipe] = {}
    kind = inputs.kind.recipe
    for i in todo:
        run = runs[i]
        say = (lambda m, run=run: log(run, m)) if log else None
        r = kind(run.config, Path(run.out), dist, allow_code=inputs.allow_code, roots=inputs.roots, log=say,
                 track=track)
        try:
            r.setup_data(inputs)
            r.setup_model()
            r.start(resume)
        except Exception as exc:  # noqa: BLE001 — this student cannot train; the others still can
            done(i, exc)
            continue
        recipes[i] = r
    index = {id(r): i for i, r in recipes.items()}
    try:
        for group in together(list(recipes.values())):
            try:
                train_group(group, on_step, (lambda r, row: on_epoch(runs[index[id(r)]], row)) if on_epoch else None,
                             stack)
                for r in group:
                    r.check_ranks_agree()
                    final = r.finish(final_eval, latency)
                    dist.barrier()
                    done(index[id(r)], RunResult(r.out, final, r.history, r.rt.describe(), count_params(r.model),
                                                 resumed_from=r.resumed_from))
            except Exception as exc:  # noqa: BLE001 — this group fails; the next one still trains
                for r in group:
                    if index[id(r)] not in results:
                        done(index[id(r)], exc)
    finally:
        dist.close()
    return [results[i] for i in range(len(runs))]


def train(
    config: TrainConfig,
    sources: Sources | str | Path | StoreReader,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    final_eval: bool = True,
    latency: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    track: Sequence[str] = (),
) -> RunResult:
    """Train ``config.student`` from ``sources`` (a :class:`Sources`, or a bare store); write the run to ``out``.

    ``resume``: continue ``out``'s checkpoint (or return at once when ``out`` is finished); without it a
    run already in ``out`` is refused (:class:`RunDirError`), or deleted and started over with ``overwrite``.
    ``latency``: time the student's CPU latency
    for ``eval.json`` (``darkstore eval`` does it on request too)."""
    (res,) = train_many([Run(config, Path(out))], sources, resume=resume, overwrite=overwrite, final_eval=final_eval,
                        latency=latency, on_epoch=(lambda _, row: on_epoch(row)) if on_epoch else None,
                        on_step=on_step, log=(lambda _, m: log(m)) if log else None, track=track)
    if isinstance(res, BaseException):
        raise res
    return res
