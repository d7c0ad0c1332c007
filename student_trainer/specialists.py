"""Training Hinton's specialists from a generalist's store (the plan comes from ``darkstore specialists plan``).

A specialist predicts its classes S and a dustbin for every other class. For each one:

1. :func:`derive_store` writes a store derived from the generalist's: the generalist's targets collapsed onto
   S and the dustbin (``[z_S, logsumexp(z_rest)]``, exact at T = 1), hard labels remapped (a class of S to its
   position, any other class to the dustbin), and the rows of S repeated so they make about half of the
   rows (the paper's oversampling), in a seeded shuffled order. The ordinary trainer then trains on it — resume,
   sweeps, DDP, AMP and the soft term (the generalist's targets as the regulariser the paper recommends) come
   with it.
2. :func:`init_weights` starts the specialist from the generalist (the paper's initialisation): every weight
   copied, the classifier head cut to S's rows plus a dustbin row (the mean of the other rows, its bias their
   mean plus log of their count: about the log of their summed probability).
3. After training, :func:`correct_dustbin` adds log(repeat) to the dustbin's bias: the oversampling made S
   ``repeat`` times likelier a priori than it is, and this takes that back (the paper's correction).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from darkstore import __version__
from darkstore.errors import SpecError
from darkstore.models import ModelSpec, load_model, save_weights
from storage import StoreMeta, StoreReader, StoreWriter, open_store
from storage.forms import form_of
from storage.schema import SpecialistOfRecord


def _collapse(z: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """[N, C] logits -> [N, |S| + 1]: S's logits and the log of the rest's summed probability, row-centred."""
    z = z.astype(np.float64, copy=False)
    rest = np.setdiff1d(np.arange(z.shape[1]), classes)
    zr = z[:, rest]
    m = zr.max(1, keepdims=True)
    dust = m + np.log(np.exp(zr - m).sum(1, keepdims=True))
    out = np.concatenate([z[:, classes], dust], axis=1)
    return out - out.max(1, keepdims=True)


def _collapsed_rows(generalist: StoreReader, classes: list[int]) -> tuple[np.ndarray, ...]:
    """The generalist's rows read a chunk at a time (never its whole [N, C] logits: 10 GB in float64 for
    ImageNet): the collapsed targets [N, |S| + 1] in float64, labels, sample indices, and whether each row
    belongs to S (its label, or for an unlabeled row the generalist's top class)."""
    if not generalist.complete:
        raise SpecError(f"{generalist.path} is not complete: finish the generalist's job before deriving specialists")
    parts = []
    for ch in generalist.iter_chunks():
        z = ch.logits.astype(np.float64)
        parts.append((_collapse(z, classes), ch.labels, ch.index,
                      np.where(ch.labels >= 0, np.isin(ch.labels, classes), np.isin(z.argmax(1), classes))))
    return tuple(np.concatenate(col) for col in zip(*parts))


def derive_store(generalist: StoreReader, classes: Sequence[int], out: str | Path, *, seed: int = 0) -> StoreReader:
    """The store one specialist trains on (see the module's docstring); an existing complete one of the same
    derivation is reused."""
    meta = generalist.meta
    if meta.views or not form_of(meta).every_class or meta.combine == "specialists" or meta.specialist_of:
        raise SpecError(f"{generalist.path}: specialists train from a plain dense store of one generalist "
                        "(no recorded views, sparse targets or specialists of its own)")
    classes = [int(k) for k in classes]
    c = meta.num_classes
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0 or max(classes) >= c or len(classes) >= c:
        raise SpecError(f"specialist classes {classes}: distinct, in [0, {c}), and not all of them")
    targets, y, index, mine = _collapsed_rows(generalist, classes)
    pos = np.full(c, len(classes), dtype=np.int64)
    pos[classes] = np.arange(len(classes))
    n, n_s = len(y), int(mine.sum())
    if n_s == 0:
        raise SpecError(f"no row of {generalist.path} belongs to classes {classes}: nothing to specialise on")
    repeat = max(1, round((n - n_s) / n_s))
    order = np.concatenate([np.arange(n)] + [np.flatnonzero(mine)] * (repeat - 1))
    order = order[np.random.default_rng([seed, 2015]).permutation(len(order))]
    record = SpecialistOfRecord(generalist_job_key=meta.job_key, generalist_store=str(generalist.path),
                                classes=classes, repeat=repeat, subset_fraction=n_s / n)
    key = hashlib.sha256(json.dumps({**record.model_dump(exclude={"generalist_store"}), "seed": seed},
                                    sort_keys=True).encode()).hexdigest()
    names = meta.class_names
    derived = StoreMeta(
        software_version=__version__, created_at=meta.created_at, job_key=key, num_rows=len(order),
        num_classes=len(classes) + 1,
        class_names=[names[k] for k in classes] + ["dustbin"] if names else None,
        chunk_rows=meta.chunk_rows, dtype=meta.dtype, compressor=meta.compressor, combine="geometric",
        temperature=1.0, keep_members=False, teachers=meta.teachers, transfer_set=meta.transfer_set,
        job={"specialist_of": record.model_dump(), "seed": seed}, specialist_of=record)
    writer = StoreWriter.open_or_create(out, derived)
    labels = np.where(y >= 0, pos[np.maximum(y, 0)], -1)
    for i in writer.pending_chunks():  # a resumed derivation writes only what is missing
        a, b = writer.bounds(i)
        r = order[a:b]
        t, lab = targets[r], labels[r]
        labeled = lab >= 0
        correct = int(((t.argmax(1) == lab) & labeled).sum())
        writer.write_chunk(i, logits=t, labels=lab, index=index[r],
                           stats=np.array([int(labeled.sum()), correct, correct]))
    return open_store(out)


def head_of(module: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The classifier head: the last ``nn.Linear`` with ``num_classes`` outputs."""
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise SpecError(f"{type(module).__name__} has no linear layer with {num_classes} outputs to cut into a "
                        "specialist's head")
    return found[-1]


def init_weights(generalist: ModelSpec, num_classes: int, classes: Sequence[int], out: Path,
                 allow_code: bool = False) -> ModelSpec:
    """The specialist's starting weights (see the module's docstring) saved to ``out``; returns its spec."""
    g = load_model(generalist, num_classes=num_classes, allow_code=allow_code).module
    spec = generalist.model_copy(update={"num_classes": len(classes) + 1, "weights": None, "name": None})
    s = load_model(spec, require_weights=False, allow_code=allow_code).module
    head_name, g_head = head_of(g, num_classes)
    state = {k: v for k, v in g.state_dict().items() if not k.startswith(head_name + ".")}
    rest = np.setdiff1d(np.arange(num_classes), classes)
    with torch.no_grad():
        w = torch.cat([g_head.weight[list(classes)], g_head.weight[rest].mean(0, keepdim=True)])
        state[head_name + ".weight"] = w
        if g_head.bias is not None:
            b = g_head.bias
            state[head_name + ".bias"] = torch.cat([b[list(classes)], (b[rest].mean() + math.log(len(rest)))[None]])
    s.load_state_dict(state, strict=True)
    save_weights(s, out)
    return spec.model_copy(update={"weights": str(out)})


def correct_dustbin(spec: ModelSpec, trained: Path, repeat: int, out: Path, allow_code: bool = False) -> Path:
    """The trained specialist with log(repeat) added to its dustbin's bias, saved to ``out``."""
    m = load_model(spec.model_copy(update={"weights": str(trained)}), allow_code=allow_code).module
    _, head = head_of(m, spec.num_classes)
    if head.bias is None:
        raise SpecError("the specialist's head has no bias to correct the dustbin with")
    with torch.no_grad():
        head.bias[-1] += math.log(repeat)
    save_weights(m, out)
    return out


def ensemble_doc(generalist: ModelSpec, trained: dict[str, tuple[ModelSpec, list[int]]], num_classes: int,
                 class_names: list[str] | None) -> dict[str, Any]:
    """An ensemble file for ``generate --combine specialists``: the generalist and every trained specialist."""
    members = [{**generalist.model_dump(mode="json", exclude_none=True), "name": "generalist"}]
    for name, (spec, _) in trained.items():
        members.append({**spec.model_dump(mode="json", exclude_none=True), "name": name})
    doc: dict[str, Any] = {"num_classes": num_classes, "members": members,
                           "specialists": {name: classes for name, (_, classes) in trained.items()}}
    if class_names:
        doc["class_names"] = class_names
    return doc


__all__ = ["correct_dustbin", "derive_store", "ensemble_doc", "head_of", "init_weights"]
