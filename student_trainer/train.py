"""Train one student against a store's cached soft targets.

One readable loop over reusable pieces: :mod:`loader` (targets streamed from the store,
joined with their inputs), :mod:`retemper` (targets at T), :mod:`losses` (the objective),
:mod:`metrics`, :mod:`evaluate` (the final report of a run).

A run directory holds ``config.json`` (written first), ``checkpoint.pt`` while training
(atomic, at every epoch end and every ``checkpoint_every`` steps), ``metrics.jsonl``,
``student.safetensors``, ``eval.json`` and last ``summary.json``: a run is finished exactly
when its summary exists. ``resume=True`` continues from the checkpoint (mid-epoch included)
to the same final weights an uninterrupted run reaches.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP and the loader is
sharded across ranks; rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from darkstore.data import TransferSet, open_transfer_set
from darkstore.models import ModelSpec, count_params, load_model, logits_of, preprocess, save_weights
from storage import StoreReader, open_store
from storage.errors import RunDirError, SchemaError, SpecError

from . import losses
from .dataset import check_transfer_set
from .loader import batch_mixing, make_loader, window_chunks
from .metrics import evaluate_logits
from .retemper import plan

HOLDOUT_SEED = 20150309  # fixed, so every student of a store is judged on the same held-out rows
CHECKPOINT_VERSION = 1
#: config fields that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {"device", "checkpoint_every"}


class TrainConfig(BaseModel):
    """Flat, commented defaults (the nanoGPT habit)."""

    model_config = ConfigDict(extra="forbid")
    student: ModelSpec
    temperature: float = Field(4.0, gt=0, description="distillation temperature T")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft term; 0 = hard labels only")
    loss: Literal["kl", "mse"] = "kl"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "linear", "step", "constant"] = "cosine"
    warmup: float = Field(0.0, ge=0, lt=1, description="fraction of all steps spent warming the LR up linearly")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision (fp16 needs CUDA)")
    seed: int = 0
    holdout: float = Field(0.1, ge=0, lt=1, description="fraction of store rows held out when no eval store is given")
    device: str = "cpu"
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes streaming the store")
    shuffle_buffer_mb: float = Field(256.0, gt=0, description="MiB of targets shuffled together (the window; up to "
                                     "three windows are in memory with read-ahead). Whole small stores shuffle at once")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    views_per_epoch: int | None = Field(None, ge=1, description="views store: random views of each sample per "
                                                              "epoch (None: all K)")
    view_targets: Literal["matched", "clean"] = Field(
        "matched", description="views store: each view's own targets, or (an ablation: the stale-target "
                               "baseline) its sample's clean-view targets")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: at epoch ends only)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (bit-exact reruns)")


@dataclass
class RunResult:
    out: Path
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    retemper: str = ""
    num_params: int = 0
    resumed_from: str | None = None  # "epoch E step S" when continued from a checkpoint
    already_finished: bool = False


def lr_lambda(schedule: str, total: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor after ``step`` scheduler steps: linear warm-up, then the schedule over the rest."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if schedule == "linear":
            return 1.0 - p
        if schedule == "step":  # ×0.1 at half and at three quarters
            return 0.1 ** ((p >= 0.5) + (p >= 0.75))
        return 1.0

    return f


def split_rows(n: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    k = int(round(n * holdout))
    return np.sort(perm[k:]), np.sort(perm[:k])


def open_checked(reader: StoreReader, data: TransferSet | None, *, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None) -> TransferSet:
    """The transfer set a store was generated from (as recorded, unless given), checked by fingerprint."""
    if data is None:
        data = open_transfer_set(reader.meta.transfer_set.spec, allow_code=allow_code, roots=roots)
    check_transfer_set(reader, data)
    return data


def eval_split(reader: StoreReader, holdout: float, eval_reader: StoreReader | None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): all finished rows and the eval store's clean rows, or a fixed holdout.

    In a views store the holdout is drawn over *samples* (no view of a held-out sample is trained
    on) and evaluation uses their clean view 0 (all their views when the recipe has no clean view)."""
    rows = reader.finished_rows()
    if eval_reader is not None:
        ev = eval_reader.finished_rows()
        return rows, _clean_rows(eval_reader, ev)
    k = reader.meta.views_per_sample
    if k == 1:
        tr, ev = split_rows(len(rows), holdout)
        return rows[tr], rows[ev]
    samples = np.unique(rows // k)
    _, held = split_rows(len(samples), holdout)
    held_rows = np.isin(rows // k, samples[held])
    return rows[~held_rows], _clean_rows(reader, rows[held_rows])


def _clean_rows(reader: StoreReader, rows: np.ndarray) -> np.ndarray:
    v = reader.meta.views
    if not v or not v["recipe"].get("clean_view0", True):
        return rows
    return rows[rows % int(v["views"]) == 0]


@torch.no_grad()
def predict(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader, data: TransferSet, rows: np.ndarray,
            device: str, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, stored teacher logits and labels over ``rows`` (float32, on the CPU)."""
    was = model.training
    model.eval()
    s, t, y = [], [], []
    for b in make_loader(reader, rows, batch_size=batch_size, shuffle=False, data=data).epoch(0):
        s.append(logits_of(model(preprocess(b.x.to(device), spec.preprocess))).float().cpu())
        t.append(b.logits.float())
        y.append(b.labels)
    model.train(was)
    if not s:
        c = reader.meta.num_classes
        return torch.empty(0, c), torch.empty(0, c), torch.empty(0, dtype=torch.int64)
    return torch.cat(s), torch.cat(t), torch.cat(y)


def evaluate(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader, data: TransferSet, rows: np.ndarray,
             device: str, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy, agreement with the teachers, NLL and ECE of ``model`` on ``rows`` of the store."""
    if len(rows) == 0:
        return {}
    return evaluate_logits(*predict(model, spec, reader, data, rows, device, batch_size))


@dataclass
class _Dist:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); world 1 without it."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> "_Dist":
        return cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: str) -> str:
        if not self.on:
            return device
        import torch.distributed as dist

        if device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.owns_group = True
        return device

    def all_min(self, values: list[int], device: str) -> list[int]:
        if not self.on:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [int(v) for v in t.tolist()]

    def all_sum(self, values: list[float], device: str) -> list[float]:
        if not self.on:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def check_device(config: TrainConfig) -> None:
    """Refuse a device or precision this machine cannot run, before anything is opened."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"--device {config.device}: no CUDA device is visible here (torch {torch.__version__}); "
                        "use --device cpu")
    if config.amp == "fp16" and not config.device.startswith("cuda"):
        raise SpecError("--amp fp16 needs a CUDA device (fp16 trains with a gradient scaler); on the CPU use --amp bf16")


def probe_student(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader, data: TransferSet,
                  device: str) -> None:
    """Run the student once on two of the store's inputs (no gradient, eval mode: no state changes), so a
    student that does not fit the data fails here with one clear message, not at step 1."""
    x, _ = data.get_batch(np.asarray(reader.index[0:min(2, reader.meta.num_rows)], dtype=np.int64))
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


MIXING_WARN = 0.9


def report_mixing(loader, reader: StoreReader, log: Callable[[str], None] | None) -> dict[str, float] | None:
    """Say how well batches mix the classes (against a full shuffle); warn when they mix poorly."""
    m = batch_mixing(loader.stream, np.asarray(reader.labels[:]))
    if m is None or log is None:
        return m
    line = (f"batches: {m['labels_per_batch']:.1f} distinct labels per batch on average, {m['full_shuffle']:.1f} "
            f"under a full shuffle ({100 * m['ratio']:.0f} %; shuffle window {m['window_chunks']} chunk(s))")
    if m["ratio"] < MIXING_WARN:
        log(f"warning: poorly mixed {line}: raise --shuffle-buffer-mb, or regenerate the store with "
            "--row-order shuffled (the default for new stores)")
    else:
        log(line)
    return m


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k))


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def train(
    config: TrainConfig,
    store: str | Path | StoreReader,
    out: str | Path,
    *,
    data: TransferSet | None = None,
    eval_store: str | Path | StoreReader | None = None,
    eval_data: TransferSet | None = None,
    allow_incomplete: bool = False,
    allow_code: bool = False,
    roots: Sequence[str | Path] | None = None,
    resume: bool = False,
    final_eval: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train ``config.student`` on ``store``; write the run to ``out``.

    ``resume``: continue ``out``'s checkpoint (or return at once when ``out`` is finished);
    without it an existing run in ``out`` is replaced."""
    out = Path(out)
    dist = _Dist.from_env()
    cfg_json = config.model_dump(mode="json")
    summary_path, ckpt_path, config_path = out / "summary.json", out / "checkpoint.pt", out / "config.json"
    if resume and summary_path.exists():
        s = json.loads(summary_path.read_text())
        diff = _config_diff(s.get("config", {}), cfg_json)
        if diff:
            raise RunDirError(f"{out} holds a finished run with another config (differs in {', '.join(diff)})")
        hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return RunResult(out, s.get("final", {}), hist, s.get("retemper", {}).get("description", ""),
                         s.get("num_params", 0), already_finished=True)

    check_device(config)
    reader = store if isinstance(store, StoreReader) else open_store(store, allow_incomplete=allow_incomplete)
    meta = reader.meta
    rt = plan(meta, config.temperature)
    if log and config.alpha > 0 and dist.main:
        log(f"targets: {rt.describe()}")
    data = open_checked(reader, data, allow_code=allow_code, roots=roots)
    ev_reader = None
    if eval_store is not None:
        ev_reader = eval_store if isinstance(eval_store, StoreReader) else open_store(eval_store)
        if ev_reader.meta.num_classes != meta.num_classes:
            raise SchemaError("the eval store has a different class count from the training store")
        ev_data = open_checked(ev_reader, eval_data, allow_code=allow_code, roots=roots)
    else:
        ev_data = data
    train_rows, ev_rows = eval_split(reader, config.holdout, ev_reader)
    ev_reader = ev_reader or reader

    if config.alpha == 0 and log and dist.main and not (np.asarray(reader.labels[:])[train_rows] >= 0).any():
        log("warning: --alpha 0 asks for hard labels only, but no training row has a label: the student learns "
            "from the soft targets alone (unlabeled rows always get the soft term), and accuracy cannot be measured")
    device = dist.init(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    loader = make_loader(reader, train_rows, batch_size=config.batch_size, seed=config.seed, shuffle=True,
                         num_workers=config.num_workers,
                         buffer_chunks=window_chunks(meta, config.shuffle_buffer_mb, members=rt.needs_members),
                         rank=dist.rank, world_size=dist.world, views_per_epoch=config.views_per_epoch,
                         view_targets=config.view_targets,
                         members=rt.needs_members, data=data, pin_memory=device.startswith("cuda"),
                         allow_code=allow_code, roots=roots)

    mixing = report_mixing(loader, reader, log if dist.main else None)
    torch.manual_seed(config.seed)
    lm = load_model(config.student, num_classes=meta.num_classes, allow_code=allow_code, roots=roots,
                    require_weights=False)
    model, spec = lm.module.to(device), config.student
    if spec.num_classes is None:
        spec = spec.model_copy(update={"num_classes": meta.num_classes})
    probe_student(model, spec, reader, data, device)
    net = model
    if dist.on:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    opt = (torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
           if config.optimizer == "adamw" else
           torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True))
    # every rank runs the same number of steps per epoch (the smallest rank's): DDP needs it
    mine = [loader.batches_in_epoch(e) for e in range(1, config.epochs + 1)]
    per_epoch = dist.all_min(mine, device)
    if dist.on and log:
        skipped = sum(mine) - sum(per_epoch)
        if skipped:
            log(f"rank {dist.rank}: {skipped} of {sum(mine)} batches over the run are beyond the smallest rank's "
                "count and are skipped (chunks are dealt to ranks whole; more chunks per rank, fewer skipped)")
    steps = max(1, sum(per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config.schedule, steps, int(config.warmup * steps)))
    dev_type = torch.device(device).type
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
    scaler = torch.amp.GradScaler(dev_type, enabled=config.amp == "fp16")

    history: list[dict[str, Any]] = []
    start_epoch, step, accum, t_prior, resumed_from = 1, 0, [0.0, 0], 0.0, None
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("version") != CHECKPOINT_VERSION:
            raise RunDirError(f"{ckpt_path} has checkpoint version {ck.get('version')}; this darkstore writes "
                              f"{CHECKPOINT_VERSION}")
        diff = _config_diff(json.loads(ck["config"]), cfg_json)
        if diff:
            raise RunDirError(f"{ckpt_path} was written with another config (differs in {', '.join(diff)}); "
                              "resume with the same settings or train into a new --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        loader.load_state_dict(ck["loader"])
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and dev_type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"], torch.device(device))
        history, step = list(ck["history"]), int(ck["step"])
        if ck["epoch_done"]:
            start_epoch = int(ck["epoch"]) + 1
        else:
            start_epoch, accum, t_prior = int(ck["epoch"]), list(ck["accum"]), float(ck["seconds"])
        resumed_from = f"epoch {ck['epoch']}{'' if ck['epoch_done'] else ' (mid-epoch)'} step {step}"
        if log and dist.main:
            log(f"resumed from {ckpt_path}: {resumed_from}")
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("summary.json", "eval.json", "checkpoint.pt", "student.safetensors"):
            (out / stale).unlink(missing_ok=True)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(cfg_json, config_path)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

    def checkpoint(epoch: int, done: bool, seconds: float) -> None:
        loader_state = loader.state_dict()
        if dist.on:  # each rank knows its own shards' progress: merge them
            import torch.distributed as tdist

            states: list[Any] = [None] * dist.world
            tdist.all_gather_object(states, loader_state)
            loader_state = dict(loader_state, seen={k: v for s in states for k, v in s["seen"].items()})
        if not dist.main:
            return
        _save_atomic({
            "version": CHECKPOINT_VERSION, "config": json.dumps(cfg_json), "epoch": epoch, "epoch_done": done,
            "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "loader": loader_state,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(torch.device(device)) if dev_type == "cuda" else None,
            "history": history, "accum": accum, "seconds": seconds,
        }, ckpt_path)

    try:
        for epoch in range(start_epoch, config.epochs + 1):
            net.train()
            t0 = time.perf_counter() - (t_prior if epoch == start_epoch else 0.0)
            budget = per_epoch[epoch - 1]  # DDP: checkpoints only at epoch ends, so epochs start whole
            for i, b in enumerate(loader.epoch(epoch)):
                if dist.on and i >= budget:
                    break
                b = b.to(device)
                y = b.labels
                with torch.autocast(dev_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    s = logits_of(net(preprocess(b.x, spec.preprocess)))
                s = s.float()
                if config.loss == "kl":
                    tlogp = rt(b.logits.float(), None if b.members is None else b.members.float())
                    loss = losses.kd_loss(s, tlogp, y, temperature=config.temperature, alpha=config.alpha,
                                          labels2=b.mix_labels, lam=b.mix_lam)
                else:
                    loss = losses.logit_mse_loss(s, b.logits.float(), y, alpha=config.alpha, labels2=b.mix_labels,
                                                 lam=b.mix_lam)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                accum[0] += float(loss.detach()) * len(y)
                accum[1] += len(y)
                if config.checkpoint_every and not dist.on and step % config.checkpoint_every == 0:
                    checkpoint(epoch, False, time.perf_counter() - t0)
                if on_step:
                    on_step(step)
            total, seen = dist.all_sum([accum[0], float(accum[1])], device)
            row = {"epoch": epoch, "step": step, "train_loss": total / max(1.0, seen), "lr": sched.get_last_lr()[0],
                   "seconds": round(time.perf_counter() - t0, 4)}
            if dist.main and len(ev_rows):
                row.update({f"eval_{k}": v for k, v in evaluate(model, spec, ev_reader, ev_data, ev_rows,
                                                                 device).items()})
            history.append(row)
            accum = [0.0, 0]
            checkpoint(epoch, True, 0.0)
            if dist.main:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if on_epoch:
                    on_epoch(row)
            dist.barrier()

        if dist.on:  # the ranks must hold the same weights; a divergence would be a bug worth stopping for
            import torch.distributed as tdist

            flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
            ref = flat.clone()
            tdist.broadcast(ref, 0)
            gap = torch.tensor([float((flat - ref).abs().max())], device=flat.device)
            tdist.all_reduce(gap, op=tdist.ReduceOp.MAX)
            if float(gap) > 0:
                raise RuntimeError(f"DDP ranks ended with different weights (max |Δ| {float(gap):.3g})")
        final: dict[str, Any] = {}
        if dist.main:
            digest = save_weights(model, out / "student.safetensors")
            final = {k.removeprefix("eval_"): v for k, v in history[-1].items() if k.startswith("eval_")}
            if final_eval:
                from .evaluate import evaluate_student

                report = evaluate_student(model, spec, ev_reader, ev_data, ev_rows, device=device,
                                          weights_path=out / "student.safetensors", allow_code=allow_code,
                                          roots=roots)
                _write_json_atomic(report, out / "eval.json")
            summary = {
                "store": str(reader.path),
                "store_job_key": meta.job_key,
                "eval_store": str(ev_reader.path) if eval_store is not None else None,
                "holdout": None if eval_store is not None else config.holdout,
                "eval_rows": int(len(ev_rows)),
                "config": cfg_json,
                "student": spec.model_dump(mode="json"),
                "num_params": count_params(model),
                "weights_sha256": digest,
                "retemper": {"mode": rt.mode, "exact": rt.exact, "description": rt.describe()},
                "mixing": mixing,
                "world_size": dist.world,
                "steps": step,
                "final": final,
            }
            _write_json_atomic(summary, summary_path)  # last: the run is finished
            ckpt_path.unlink(missing_ok=True)
        dist.barrier()
    finally:
        dist.close()
    return RunResult(out, final, history, rt.describe(), count_params(model), resumed_from=resumed_from)
