"""The training recipe of one student, read top to bottom (the torchtune habit): setup (data, model and
optimiser), the run folder and checkpoints, epochs of steps, the finished run.

One readable loop over reusable pieces: :mod:`.loader` (targets streamed from the store, joined with their
inputs), :mod:`.retemper` (targets at T), :mod:`.objectives` (the loss), :mod:`.eval_cache` and
:mod:`.evaluate` (the final report), :mod:`.run_dir` (the run folder), :mod:`.distributed` (DDP).
:class:`Recipe` is the class students'; :mod:`.lm_train` derives the language models' from it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from darkstore.data import TransferSet
from darkstore.device import check_device as check_device_name
from darkstore.transfer import open_transfer_set
from darkstore.errors import SpecError
from darkstore.fingerprint import FingerprintPolicy
from darkstore.models import ModelSpec, count_params, load_model, logits_of, preprocess, save_weights
from storage import StoreMeta, StoreReader
from storage.location import canonical
from student_trainer.errors import RunDirError

from . import objectives
from .config import CLASS_OPTIMISER, TrainConfig
from .dataset import check_transfer_set
from .loader import batch_mixing, window_chunks
from .objectives import student_layer_shape
from .forms import soft_term
from .retemper import plan, unused
from .tracking import open_trackers
from .distributed import Dist
from .eval_cache import evaluate
from .eval_report import evaluate_student
from .run_dir import CHECKPOINT_VERSION, config_diff, save_atomic, write_json_atomic


if TYPE_CHECKING:
    from .inputs import Inputs


def lr_lambda(schedule: str, total: int, warmup_steps: int, floor: float = 0.0) -> Callable[[int], float]:
    """LR factor after ``step`` scheduler steps: linear warm-up, then the schedule over the rest (cosine and
    linear from 1 down to ``floor``)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
        if schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - p)
        if schedule == "step":  # ×0.1 at half and at three quarters
            return 0.1 ** ((p >= 0.5) + (p >= 0.75))
        return 1.0

    return f


def param_groups(params: list[torch.Tensor], weight_decay: float, decay: str) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: ``weight_decay`` on every parameter (``all``), or on matrices only
    (``matrices``: weights and embeddings, two or more dimensions; biases and norms' gains do not decay)."""
    if decay == "all" or not weight_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def open_checked(reader: StoreReader, data: TransferSet | None, *, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None,
                 fingerprints: FingerprintPolicy | None = None) -> TransferSet:
    """The transfer set a store was generated from (as recorded, unless given), checked by fingerprint."""
    if data is None:
        data = open_transfer_set(reader.meta.transfer_set.spec, allow_code=allow_code, roots=roots,
                                 fingerprints=fingerprints)
    check_transfer_set(reader, data)
    return data


def check_device(config: TrainConfig) -> None:
    """Refuse a device or precision this machine cannot run, before anything is opened."""
    check_device_name(config.device)
    if config.amp == "fp16" and not config.device.startswith("cuda"):
        raise SpecError("--amp fp16 needs a CUDA device (fp16 trains with a gradient scaler); on the CPU use --amp bf16")


def probe_student(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader, data: TransferSet,
                  device: str) -> torch.Tensor:
    """Run the student once on two of the store's inputs (no gradient, eval mode: no state changes), so a
    student that does not fit the data fails here with one clear message, not at step 1. Returns those
    inputs, preprocessed (what the student saw)."""
    rows = reader.finished_rows()[:2]
    x, _ = data.get_batch(reader.read(rows, ["index"])["index"])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(preprocess(x.to(device), spec.preprocess)))
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 — a shape mismatch raises RuntimeError deep inside torch
        msg = " ".join(str(exc).split())[:300]
        raise SpecError(f"the student {spec.label!r} fails on the store's inputs {tuple(x.shape)}: {msg}; "
                        "fix --arch-kwargs (e.g. in_features/in_channels) or the student's preprocess") from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != reader.meta.num_classes:
        raise SpecError(f"the student {spec.label!r} returns shape {tuple(out.shape)}; the store has "
                        f"{reader.meta.num_classes} classes: expected [batch, {reader.meta.num_classes}]")
    return preprocess(x.to(device), spec.preprocess)


MIXING_WARN = 0.9


def report_mixing(loader, log: Callable[[str], None] | None) -> dict[str, float] | None:
    """Say how well batches mix the classes (against a full shuffle); warn when they mix poorly."""
    if loader.stream.labels is None:  # token rows: no classes to mix
        return None
    m = batch_mixing(loader.stream, loader.stream.labels)  # read once, by the loader
    if m is None or log is None:
        return m
    n_chunks = loader.stream.n_chunks
    window = ("the whole store" if m["window_chunks"] >= n_chunks
              else f"{m['window_chunks']} of {n_chunks} chunks")
    line = (f"batches: {m['labels_per_batch']:.1f} distinct labels per batch on average, {m['full_shuffle']:.1f} "
            f"under a full shuffle ({100 * m['ratio']:.0f} %; shuffle window: {window})")
    if m["ratio"] < MIXING_WARN:
        log(f"warning: poorly mixed {line}: raise --shuffle-buffer-mb, or regenerate the store with "
            "--row-order shuffled (the default for new stores)")
    else:
        log(line)
    return m


@dataclass(frozen=True)
class Stage:
    """A span of epochs trained with one objective (FitNets: the hint stage, then KD)."""
    name: str
    objective: objectives.Objective
    first: int  # first and last epoch, counted over the whole run from 1
    last: int
    heads: bool = False  # whether the objective's heads run and train in this stage


def plan_stages(c: TrainConfig) -> list[Stage]:
    if c.loss == "hint":
        return [Stage("hint", objectives.get("hint"), 1, c.hint_epochs, heads=True),
                Stage("kd", objectives.get("kl"), c.hint_epochs + 1, c.total_epochs)]
    return [Stage(c.loss, objectives.get(c.loss), 1, c.epochs)]


def hint_feature(meta, wanted: str | None) -> str:
    """The stored feature a hint run uses: ``wanted`` (TEACHER:LAYER, or a layer name that only one teacher
    has), or the store's only one."""
    names = list(meta.feature_slices())
    if wanted is None:
        if len(names) == 1:
            return names[0]
        raise SpecError(f"the store keeps {len(names)} teacher layers ({', '.join(names)}); name one with --hint-layer")
    if wanted in names:
        return wanted
    match = [n for n in names if n.partition(":")[2] == wanted]
    if len(match) == 1:
        return match[0]
    raise SpecError(f"--hint-layer {wanted!r}: the store keeps {', '.join(names) or 'no teacher layers'}")


def eval_store_warnings(train: StoreMeta, ev: StoreMeta) -> list[str]:
    """What makes an eval store's numbers mean something else than a user expects: the training inputs
    themselves, or other teachers."""
    said = []
    if ev.transfer_set.fingerprint == train.transfer_set.fingerprint:
        said.append("warning: the eval store was made from the training store's own transfer set (the same "
                    "fingerprint): metrics on it measure fit to the training inputs, not held-out accuracy")
    ours = sorted(t.sha256 or t.name for t in train.teachers)
    theirs = sorted(t.sha256 or t.name for t in ev.teachers)
    if ours != theirs:
        said.append(f"warning: the eval store's teachers ({', '.join(t.name for t in ev.teachers)}) are not the "
                    f"training store's ({', '.join(t.name for t in train.teachers)}) by their weights: agreement and "
                    "the teacher columns describe other teachers than the student learned from")
    return said




class Recipe:
    """One training run, read top to bottom: data (:meth:`setup_data`), model and optimiser
    (:meth:`setup_model`), the run folder (:meth:`start`), then epochs of steps (:meth:`epoch`,
    :meth:`step`) with checkpoints (:meth:`checkpoint`), and the finished run (:meth:`finish`).
    The order of everything that draws random numbers is fixed: a resumed run reaches the same weights."""

    stackable = True  # students of one architecture may step as one stacked model (student_trainer.stack)
    optimiser_defaults = CLASS_OPTIMISER  # the optimiser settings a run leaves unset

    def __init__(self, config: TrainConfig, out: Path, dist: Dist, *, allow_code: bool,
                 roots: Sequence[str | Path] | None, log: Callable[[str], None] | None, track: Sequence[str] = ()):
        self.config, self.out, self.dist = config.with_defaults(self.optimiser_defaults), out, dist
        self.track, self.trackers = list(track), []  # run tracking (student_trainer.tracking), main rank only
        self.allow_code, self.roots = allow_code, roots
        self.log = log if dist.main else None  # what the run says once
        self.rank_log = log  # what every rank says for itself
        self.cfg_json = config.model_dump(mode="json")
        self.ckpt_path = out / "checkpoint.pt"
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.steps_done, self.accum, self.t_prior = 1, 0, [0.0, 0], 0.0
        self.loss_acc: torch.Tensor | None = None  # accum[0] kept on the device between flushes (no sync a step)
        self.weight_acc: torch.Tensor | None = None  # accum[1], likewise
        self.resumed_from: str | None = None
        self.loader_state: dict[str, Any] | None = None  # where the checkpoint's loader stood (None: a fresh run)
        self.stacked_with = 0  # other students stepped with this one as one stacked model

    # -- setup ------------------------------------------------------------------------------
    def setup_data(self, inputs: "Inputs") -> None:
        c, log = self.config, self.log
        check_device(c)
        self.inputs, self.reader, self.meta = inputs, inputs.reader, inputs.meta
        self.stages = plan_stages(c)
        for st in self.stages:
            st.objective.check(self.meta, self.reader.path)
        self.hint_name = hint_feature(self.meta, c.hint_layer) if c.loss == "hint" else None
        uses_targets = any(st.objective.needs in ("targets", "logits") for st in self.stages)
        self.rt = plan(self.meta, c.temperature) if uses_targets else unused(c.temperature)
        self.soft = soft_term(self.meta, self.rt, topk_loss=c.topk_loss) if uses_targets else None
        if log and c.alpha > 0 and uses_targets:
            log(f"targets: {self.rt.describe()}")
        for warning in inputs.warnings if log else ():
            log(warning)
        self.data, self.ev_data, self.has_eval_store = inputs.data, inputs.ev_data, inputs.has_eval_store
        self.ev_reader = inputs.ev_reader or self.reader
        self.train_rows, self.ev_rows, self.eval_rows = inputs.split(c.holdout)
        if c.alpha == 0 and log and not (self.reader.read_field("labels")[self.train_rows] >= 0).any():
            log("warning: --alpha 0 asks for hard labels only, but no training row has a label: the student learns "
                "from the soft targets alone (unlabeled rows always get the soft term), and accuracy cannot be "
                "measured")
        device = self.setup_device()
        features = self.hint_name is not None
        self.loader, self.mixing = inputs.loader(
            self.train_rows, log, batch_size=c.batch_size, seed=c.seed, shuffle=True, num_workers=c.num_workers,
            buffer_chunks=window_chunks(self.meta, c.shuffle_buffer_mb, members=self.rt.needs_members,
                                        features=features),
            rank=self.dist.rank, world_size=self.dist.world, views_per_epoch=c.views_per_epoch,
            view_targets=c.view_targets, members=self.rt.needs_members, pin_memory=device.startswith("cuda"),
            features=features, replay_device=None if torch.device(device).type == "cpu" else device)

    def setup_device(self) -> str:
        """This rank's device, torch's threads and determinism as the config asks."""
        c = self.config
        self.device = self.dist.init(c.device)
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        if c.deterministic:
            torch.use_deterministic_algorithms(True)
        return self.device

    def setup_model(self) -> None:
        c, device = self.config, self.device
        torch.manual_seed(c.seed)
        lm = load_model(c.student, num_classes=self.meta.num_classes, allow_code=self.allow_code, roots=self.roots,
                        require_weights=False)
        self.model, self.spec = lm.module.to(device), c.student
        if self.spec.num_classes is None:
            self.spec = self.spec.model_copy(update={"num_classes": self.meta.num_classes})
        x = probe_student(self.model, self.spec, self.reader, self.data, device)
        layers, heads = {}, {}
        if self.hint_name is not None:  # FitNets' regressor: from the guided student layer to the stored hint
            shape = student_layer_shape(self.model, c.student_layer, x)
            layers = {self.hint_name: c.student_layer}
            heads = {self.hint_name: objectives.regressor(shape, self.meta.feature_slices()[self.hint_name][1])}
        self.wrapped = objectives.WithHeads(self.model, layers, heads).to(device)
        self.setup_steps(bool(heads))

    def setup_steps(self, heads: bool) -> None:
        """The DDP wrapper (under torchrun), the steps per epoch every rank agrees on, precision, and this
        student's own random stream."""
        c, dist, device = self.config, self.dist, self.device
        self.net = self.wrapped
        if dist.on:  # one module: the heads' gradients are averaged with the student's
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                find_unused_parameters=bool(heads))
        # every rank runs the same number of steps per epoch (the smallest rank's): DDP needs it
        mine = [self.loader.batches_in_epoch(e) for e in range(1, c.total_epochs + 1)]
        self.per_epoch = dist.all_min(mine, device)
        skipped = sum(mine) - sum(self.per_epoch)
        if dist.on and skipped and self.rank_log:
            self.rank_log(f"rank {dist.rank}: {skipped} of {sum(mine)} batches over the run are beyond the smallest "
                          "rank's count and are skipped (chunks are dealt to ranks whole; more chunks per rank, fewer "
                          "skipped)")
        self.dev_type = torch.device(device).type
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[c.amp]
        self.rng = torch.get_rng_state()  # this student's random stream (dropout, …), apart from its neighbours'
        self.cuda_rng = torch.cuda.get_rng_state(torch.device(device)) if self.dev_type == "cuda" else None

    @contextmanager
    def own_rng(self):
        """Run with this student's random stream, and keep where it got to: students trained together draw
        exactly what each would draw alone."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, torch.device(self.device))
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(torch.device(self.device))

    def enter_stage(self, stage: "Stage") -> None:
        """A fresh optimiser, schedule and gradient scaler over what ``stage`` trains: the student and, in a
        stage that uses them, its heads (parameters a stage's loss never reaches get no gradient and stay)."""
        c = self.config
        self.stage = stage
        self.wrapped.heads_on = stage.heads
        params = list(self.wrapped.parameters() if stage.heads else self.model.parameters())
        self.opt, self.sched = self.optimiser(params)
        self.scaler = torch.amp.GradScaler(self.dev_type, enabled=c.amp == "fp16")

    def optimiser(self, params: list[torch.Tensor]):
        """This run's optimiser and LR schedule over ``params`` for the current stage (a stack of students
        builds its own over the stacked parameters with this too)."""
        c, stage = self.config, self.stage
        groups = param_groups(params, c.weight_decay, c.decay)
        opt = (torch.optim.AdamW(groups, lr=c.lr, betas=c.betas) if c.optimizer == "adamw" else
               torch.optim.SGD(groups, lr=c.lr, momentum=0.9, nesterov=True))
        steps = max(1, sum(self.per_epoch[stage.first - 1:stage.last]))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(c.schedule, steps, int(c.warmup * steps),
                                                                     c.lr_floor))

    def stage_of(self, epoch: int) -> "Stage":
        return next(st for st in self.stages if st.first <= epoch <= st.last)

    # -- the run folder and checkpoints ---------------------------------------------------------
    def start(self, resume: bool) -> None:
        """Restore the checkpoint (``resume``), or clear a previous run; write config.json and metrics so far."""
        out, dist = self.out, self.dist
        if resume and self.ckpt_path.exists():
            self.restore(torch.load(self.ckpt_path, map_location="cpu", weights_only=True))
            if self.log:
                self.log(f"resumed from {self.ckpt_path}: {self.resumed_from}")
        else:
            self.enter_stage(self.stages[0])
            if dist.main:
                out.mkdir(parents=True, exist_ok=True)
                for stale in ("summary.json", "eval.json", "checkpoint.pt", "student.safetensors"):
                    (out / stale).unlink(missing_ok=True)
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.cfg_json, out / "config.json")
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
            self.trackers = open_trackers(self.track, out, self.history)

    def restore(self, ck: dict[str, Any]) -> None:
        if ck.get("version") != CHECKPOINT_VERSION:
            raise RunDirError(f"{self.ckpt_path} has checkpoint version {ck.get('version')}; this darkstore writes "
                              f"{CHECKPOINT_VERSION}")
        diff = config_diff(json.loads(ck["config"]), self.cfg_json)
        if diff:
            raise RunDirError(f"{self.ckpt_path} was written with another config (differs in {', '.join(diff)}); "
                              "resume with the same settings or train into a new --out")
        self.model.load_state_dict(ck["model"])
        self.wrapped.heads.load_state_dict(ck.get("heads", {}))
        self.loader.load_state_dict(ck["loader"])  # refuses a state from other ranks, workers or seed
        self.loader_state = ck["loader"]
        self.rng = ck["rng"]
        if ck.get("cuda_rng") is not None and self.dev_type == "cuda":
            self.cuda_rng = ck["cuda_rng"]
        self.history, self.steps_done = list(ck["history"]), int(ck["step"])
        if ck["epoch_done"]:
            self.start_epoch = int(ck["epoch"]) + 1
        else:
            self.start_epoch, self.accum, self.t_prior = int(ck["epoch"]), list(ck["accum"]), float(ck["seconds"])
        stage = self.stage_of(min(self.start_epoch, self.config.total_epochs))
        self.enter_stage(stage)
        if ck.get("stage", 0) == self.stages.index(stage):  # else the checkpoint ended the previous stage
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
        self.resumed_from = f"epoch {ck['epoch']}{'' if ck['epoch_done'] else ' (mid-epoch)'} step {self.steps_done}"

    def checkpoint(self, epoch: int, done: bool, seconds: float) -> None:
        dist = self.dist
        self.flush()
        loader_state = self.loader.state_dict()
        if dist.on:  # each rank knows its own shards' progress: merge them
            import torch.distributed as tdist

            states: list[Any] = [None] * dist.world
            tdist.all_gather_object(states, loader_state)
            loader_state = dict(loader_state, seen={k: v for s in states for k, v in s["seen"].items()})
        if not dist.main:
            return
        save_atomic({
            "version": CHECKPOINT_VERSION, "config": json.dumps(self.cfg_json), "epoch": epoch, "epoch_done": done,
            "step": self.steps_done, "model": self.model.state_dict(), "heads": self.wrapped.heads.state_dict(),
            "stage": self.stages.index(self.stage), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "loader": loader_state,
            "rng": self.rng, "cuda_rng": self.cuda_rng,
            "history": self.history, "accum": self.accum, "seconds": seconds,
        }, self.ckpt_path)

    # -- training ---------------------------------------------------------------------------
    def step(self, b) -> None:
        """One optimiser step on a batch already on the device (run inside :meth:`own_rng`)."""
        c = self.config
        y = b.labels
        with torch.autocast(self.dev_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out, heads = self.net(preprocess(b.x, self.spec.preprocess))
        loss = self.stage.objective.fn(objectives.Step(
            logits_of(out).float(), b, alpha=c.alpha, soft=self.soft, heads={k: v.float() for k, v in heads.items()}))
        self.apply(loss, len(y))

    def apply(self, loss: torch.Tensor, weight: int | torch.Tensor) -> None:
        """Backward, the optimiser's and the schedule's step, and the epoch's loss sum (``loss`` a mean over
        ``weight`` rows or positions, a count on the host or a 0-d integer tensor on the device), kept on the
        device: no host sync a step."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.max_grad_norm:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                           self.config.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.steps_done += 1
        if self.loss_acc is None:
            self.loss_acc = torch.tensor(self.accum[0], dtype=torch.float64, device=loss.device)
            self.weight_acc = torch.tensor(self.accum[1], dtype=torch.int64, device=loss.device)
        self.loss_acc += loss.detach().double() * weight  # the same float64 sums as on the host, in the same order
        self.weight_acc += weight

    def flush(self) -> None:
        """Bring the epoch's loss sum to the host (before a checkpoint or the epoch's metrics)."""
        if self.loss_acc is not None:
            self.accum[0], self.accum[1] = float(self.loss_acc), int(self.weight_acc)
            self.loss_acc = self.weight_acc = None

    def add_sums(self, loss_sum: float, weight: int) -> None:
        """Steps taken elsewhere (a stack's, for this student) counted into the epoch's sums, after its own."""
        self.flush()
        self.accum[0] += loss_sum
        self.accum[1] += weight

    def begin_epoch(self, epoch: int) -> None:
        if not self.stage.first <= epoch <= self.stage.last:
            self.enter_stage(self.stage_of(epoch))
        self.net.train()
        self.t0 = time.perf_counter() - (self.t_prior if epoch == self.start_epoch else 0.0)

    def checkpoint_due(self) -> bool:
        c = self.config
        return bool(c.checkpoint_every) and not self.dist.on and self.steps_done % c.checkpoint_every == 0

    def after_step(self, epoch: int) -> None:
        if self.checkpoint_due():
            self.checkpoint(epoch, False, time.perf_counter() - self.t0)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """The epoch's metrics row (evaluated on the eval rows), the checkpoint, ``metrics.jsonl``."""
        dist = self.dist
        self.flush()
        total, seen = dist.all_sum([self.accum[0], float(self.accum[1])], self.device)
        row = {"epoch": epoch, "step": self.steps_done, "train_loss": total / max(1.0, seen),
               "lr": self.sched.get_last_lr()[0], "seconds": round(time.perf_counter() - self.t0, 4)}
        row.update(self.epoch_extra(seen, row["seconds"]))
        if len(self.stages) > 1:
            row["stage"] = self.stage.name
        if dist.main and len(self.ev_rows):
            row.update({f"eval_{k}": v for k, v in self.evaluate_now().items()})
        self.history.append(row)
        self.accum = [0.0, 0]
        self.checkpoint(epoch, True, 0.0)
        if dist.main:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            for t in self.trackers:
                t.epoch(row)
        return row

    def epoch_extra(self, seen: float, seconds: float) -> dict[str, Any]:
        """What an epoch's metrics row adds to its loss (a language model's: the tokens and tokens/s)."""
        return {}

    def evaluate_now(self) -> dict[str, float]:
        """The student's metrics on the eval rows (each epoch's row of metrics.jsonl)."""
        return evaluate(self.model, self.spec, self.eval_rows, device=self.device)

    def position(self) -> tuple:
        """Where this run stands: students train together only from the same place."""
        return self.start_epoch, self.steps_done, json.dumps(self.loader_state, sort_keys=True)

    # -- the finished run ---------------------------------------------------------------------
    def check_ranks_agree(self) -> None:
        """Under DDP the ranks must hold the same weights; a divergence would be a bug worth stopping for."""
        if not self.dist.on:
            return
        import torch.distributed as tdist

        flat = torch.cat([p.detach().reshape(-1).float() for p in self.wrapped.parameters()])  # heads too
        ref = flat.clone()
        tdist.broadcast(ref, 0)
        gap = torch.tensor([float((flat - ref).abs().max())], device=flat.device)
        tdist.all_reduce(gap, op=tdist.ReduceOp.MAX)
        if float(gap) > 0:
            raise RuntimeError(f"DDP ranks ended with different weights (max |Δ| {float(gap):.3g})")

    def save_student(self) -> str:
        """The trained student's weights in the run folder; returns their sha256."""
        return save_weights(self.model, self.out / "student.safetensors")

    def final_report(self, latency: bool) -> dict[str, Any]:
        """eval.json: the student against the teachers on the eval rows."""
        return evaluate_student(self.model, self.spec, self.ev_reader, self.ev_data, self.ev_rows,
                                device=self.device, weights_path=self.out / "student.safetensors", latency=latency,
                                allow_code=self.allow_code, roots=self.roots, eval_rows=self.eval_rows,
                                cache_dir=self.inputs.cache_dir)

    def summary(self, digest: str) -> dict[str, Any]:
        """summary.json's record of the run (its final metrics are added by :meth:`finish`)."""
        c = self.config
        return {
            "store": canonical(self.reader.location),
            "store_job_key": self.meta.job_key,
            "kind": self.meta.kind.name,  # the run's row kind (student_trainer.kinds)
            "eval_store": canonical(self.ev_reader.location) if self.has_eval_store else None,
            "holdout": None if self.has_eval_store else c.holdout,
            "eval_rows": int(len(self.ev_rows)),
            "config": self.cfg_json,
            # the optimiser settings that ran (the row kind's defaults where the config leaves them unset)
            "optimiser": {k: getattr(c, k) for k in self.optimiser_defaults},
            "student": self.spec.model_dump(mode="json"),
            "num_params": count_params(self.model),
            "weights_sha256": digest,
            "retemper": {"mode": self.rt.mode, "exact": self.rt.exact, "description": self.rt.describe()},
            "stages": [{"name": st.name, "objective": st.objective.name, "epochs": [st.first, st.last]}
                       for st in self.stages],
            **({"hint": {"teacher_layer": self.hint_name, "student_layer": c.student_layer,
                         "regressor_params": count_params(self.wrapped.heads)}} if self.hint_name else {}),
            "mixing": self.mixing,
            "world_size": self.dist.world,
            "stacked_with": self.stacked_with,
            "steps": self.steps_done,
            # wall seconds of training (resumed runs included); students stacked together share theirs
            "seconds": self.history[-1].get("seconds") if self.history else None,
        }

    def finish(self, final_eval: bool, latency: bool = False) -> dict[str, Any]:
        """Weights, eval.json, then summary.json last (the run is finished exactly when it exists)."""
        if not self.dist.main:
            return {}
        out = self.out
        digest = self.save_student()
        final = {k.removeprefix("eval_"): v for k, v in self.history[-1].items() if k.startswith("eval_")}
        if final_eval and len(self.ev_rows):  # --holdout 0 without an eval store: nothing to evaluate on
            write_json_atomic(self.final_report(latency), out / "eval.json")
        summary = {**self.summary(digest), "final": final}
        write_json_atomic(summary, out / "summary.json")
        self.ckpt_path.unlink(missing_ok=True)
        for t in self.trackers:
            t.finish(self.cfg_json, final)
            t.close()
        return final
