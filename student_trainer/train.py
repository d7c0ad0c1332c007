"""Train one student against a store's cached soft targets.

One readable loop over reusable pieces: :mod:`loader` (targets streamed from the store,
joined with their inputs), :mod:`retemper` (targets at T), :mod:`losses` (the objective),
:mod:`metrics`.
"""

from __future__ import annotations

import json
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

from . import losses
from .dataset import check_transfer_set
from .loader import make_loader
from .metrics import evaluate_logits
from .retemper import plan

HOLDOUT_SEED = 20150309  # fixed, so every student of a store is judged on the same held-out rows


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
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    holdout: float = Field(0.1, ge=0, lt=1, description="fraction of store rows held out when no eval store is given")
    device: str = "cpu"
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes streaming the store")
    buffer_chunks: int = Field(4, ge=1, description="store chunks shuffled together")


@dataclass
class RunResult:
    out: Path
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    retemper: str = ""
    num_params: int = 0


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, spec: ModelSpec, reader: StoreReader, data: TransferSet, rows: np.ndarray,
             device: str, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy, agreement with the teachers and NLL of ``model`` on ``rows`` of the store."""
    model.eval()
    s, t, y = [], [], []
    for b in make_loader(reader, rows, batch_size=batch_size, shuffle=False, data=data).epoch(0):
        s.append(logits_of(model(preprocess(b.x.to(device), spec.preprocess))).float().cpu())
        t.append(b.logits.float())
        y.append(b.labels)
    if not s:
        return {}
    return evaluate_logits(torch.cat(s), torch.cat(t), torch.cat(y))


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
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reader = store if isinstance(store, StoreReader) else open_store(store, allow_incomplete=allow_incomplete)
    meta = reader.meta
    rt = plan(meta, config.temperature)
    if log and config.alpha > 0:
        log(f"targets: {rt.describe()}")
    data = open_checked(reader, data, allow_code=allow_code, roots=roots)
    rows = reader.finished_rows()

    if eval_store is not None:
        ev_reader = eval_store if isinstance(eval_store, StoreReader) else open_store(eval_store)
        if ev_reader.meta.num_classes != meta.num_classes:
            from storage.errors import SchemaError

            raise SchemaError("the eval store has a different class count from the training store")
        ev_data = open_checked(ev_reader, eval_data, allow_code=allow_code, roots=roots)
        train_rows, ev_rows = rows, ev_reader.finished_rows()
    else:
        ev_reader, ev_data = reader, data
        tr_pos, ev_pos = split_rows(len(rows), config.holdout)
        train_rows, ev_rows = rows[tr_pos], rows[ev_pos]
    loader = make_loader(reader, train_rows, batch_size=config.batch_size, seed=config.seed, shuffle=True,
                         num_workers=config.num_workers, buffer_chunks=config.buffer_chunks,
                         members=rt.needs_members, data=data, pin_memory=config.device.startswith("cuda"),
                         allow_code=allow_code, roots=roots)

    _seed_everything(config.seed)
    lm = load_model(config.student, num_classes=meta.num_classes, allow_code=allow_code, roots=roots,
                    require_weights=False)
    model, spec = lm.module.to(config.device), config.student
    if spec.num_classes is None:
        spec = spec.model_copy(update={"num_classes": meta.num_classes})
    opt = (torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
           if config.optimizer == "adamw" else
           torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True))
    steps = sum(loader.batches_in_epoch(e) for e in range(1, config.epochs + 1))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
             if config.schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))

    history: list[dict[str, Any]] = []
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    for epoch in range(1, config.epochs + 1):
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        for b in loader.epoch(epoch):
            b = b.to(config.device)
            x, y = b.x, b.labels
            s = logits_of(model(preprocess(x, spec.preprocess)))
            if config.loss == "kl":
                tlogp = rt(b.logits.float(), None if b.members is None else b.members.float())
                loss = losses.kd_loss(s, tlogp, y, temperature=config.temperature, alpha=config.alpha)
            else:
                loss = losses.logit_mse_loss(s, b.logits.float(), y, alpha=config.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
        row = {"epoch": epoch, "train_loss": total / max(1, seen), "lr": sched.get_last_lr()[0],
               "seconds": round(time.perf_counter() - t0, 4)}
        if len(ev_rows):
            row.update({f"eval_{k}": v for k, v in evaluate(model, spec, ev_reader, ev_data, ev_rows,
                                                             config.device).items()})
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if on_epoch:
            on_epoch(row)

    digest = save_weights(model, out / "student.safetensors")
    final = {k.removeprefix("eval_"): v for k, v in history[-1].items() if k.startswith("eval_")}
    summary = {
        "store": str(reader.path),
        "store_job_key": meta.job_key,
        "eval": "eval store " + str(ev_reader.path) if eval_store is not None else f"holdout {config.holdout:g}",
        "config": config.model_dump(mode="json"),
        "student": spec.model_dump(mode="json"),
        "num_params": count_params(model),
        "weights_sha256": digest,
        "retemper": {"mode": rt.mode, "exact": rt.exact, "description": rt.describe()},
        "final": final,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(out, final, history, rt.describe(), count_params(model))
