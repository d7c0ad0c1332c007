"""A job made ready to run: its loaded ensemble, its transfer set in store order and its store's metadata
(:class:`PreparedJob`), shared by generation of every row kind (:mod:`.generate`, :mod:`.sequences`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import darkstore
from darkstore.data import Reordered, TransferSet
from darkstore.errors import ClassCountMismatchError, SpecError, WeightsNotFoundError
from darkstore.fingerprint import FingerprintPolicy
from darkstore.lm import folder_digest
from darkstore.paths import resolve
from darkstore.transfer import open_transfer_set
from darkstore.models import LoadedModel, ModelSpec, count_params_meta, load_model, sha256_file
from darkstore.views import ViewSet
from storage import StoreMeta, TeacherRecord, TransferSetRecord, sample_order
from storage.errors import NonFiniteLogitsError
from storage.schema import FeatureRecord, SpecialistRecord, SpecialistsRecord, TargetsRecord
from teacher_service.errors import LimitExceededError

from .engines.vllm import VllmServer, engine_digest
from .features import FeatureTaps
from .spec import EnsembleSpec, JobSpec


class Cancelled(Exception):
    """A run stopped on request between chunks."""


@dataclass
class Ensemble:
    members: list[LoadedModel]
    num_classes: int
    device: torch.device

    precision: str = "float32"
    channels_last: bool = False
    specialist_classes: dict[str, list[int]] | None = None  # combine specialists: a specialist's classes

    def __post_init__(self) -> None:
        self._spread = {name: torch.tensor(classes, dtype=torch.int64, device=self.device)
                        for name, classes in (self.specialist_classes or {}).items()}

    def _spread_specialist(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """[B, |S| + 1] a specialist's logits -> [B, C] its log-probabilities in the generalist's classes: its
        own classes where they are, the dustbin's mass spread evenly over the rest (what the combination needs:
        each class of S and the dustbin's total; kept members stay in C columns)."""
        logp = torch.log_softmax(z, dim=-1)
        rest = self.num_classes - len(classes)
        out = (logp[:, -1:] - math.log(rest)).expand(-1, self.num_classes).clone()
        out[:, classes] = logp[:, :-1]
        return out

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, rows: np.ndarray, check: bool = True) -> torch.Tensor:
        """[B, ...] -> [M, B, C] float32 logits (a specialist's log-probabilities spread over the C classes).
        With ``check``, non-finite output names the member and rows here (a device sync); :func:`run_chunks`
        checks on the host instead."""
        outs = []
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = self.precision != "float32"
        for m in self.members:
            with torch.autocast(self.device.type, dtype=getattr(torch, self.precision), enabled=amp):
                z = m.forward(x).float()
            if m.name in self._spread:
                z = self._spread_specialist(z, self._spread[m.name])
            if not check:
                outs.append(z)
                continue
            finite = torch.isfinite(z).all(dim=1)
            if not bool(finite.all()):
                bad = rows[(~finite).cpu().numpy()]
                shown = ", ".join(map(str, bad[:10])) + (f" … ({len(bad)} rows)" if len(bad) > 10 else "")
                raise NonFiniteLogitsError(f"teacher {m.name!r} produced NaN/Inf logits for rows {shown}")
            outs.append(z)
        return torch.stack(outs)


def load_ensemble(
    spec: EnsembleSpec,
    *,
    device: str | torch.device = "cpu",
    allow_code: bool = False,
    roots: Sequence[str | Path] | None = None,
    num_classes_hint: int | None = None,
    max_params: int | None = None,
) -> list[LoadedModel]:
    """Load every member safely, in eval mode on ``device``; weights move there once. With ``max_params``,
    the members' parameters are counted first on the meta device (nothing allocated) and an ensemble
    over the budget is refused before any weight is loaded."""
    c = spec.num_classes or (len(spec.class_names) if spec.class_names else None) or num_classes_hint
    if max_params is not None:
        check_param_budget(spec.members, c, max_params)
    members = []
    for m in spec.members:
        lm = load_model(m, num_classes=c, allow_code=allow_code, roots=roots)
        lm.module.to(device)
        try:
            lm.module.eval()
        except NotImplementedError:  # torch.export programs keep the mode they were exported in
            pass
        members.append(lm)
    return members


def check_param_budget(members: Sequence[ModelSpec], num_classes: int | None, max_params: int) -> None:
    counts = {}
    for m in members:
        if m.arch is None:
            continue  # code-carrying members (the operator allowed that code) and transformers directories
        n = count_params_meta(m, num_classes)
        if n > max_params:
            raise LimitExceededError(f"teacher {m.label!r} has {n:,} parameters, over the limit of {max_params:,} "
                                     "(DARKSTORE_MAX_TEACHER_PARAMS)")
        counts[m.label] = n
    if sum(counts.values()) > max_params:
        raise LimitExceededError(f"the teachers have {sum(counts.values()):,} parameters together, over the limit "
                                 f"of {max_params:,} (DARKSTORE_MAX_TEACHER_PARAMS)")


def probe_classes(members: list[LoadedModel], x: torch.Tensor, declared: int | None,
                  specialists: dict[str, list[int]] | None = None) -> int:
    """Run each member on a couple of samples: they must agree on the class count (a specialist predicts its
    classes and a dustbin; the others, the generalist's count)."""
    specialists = specialists or {}
    counts, widths = {}, {}
    with torch.inference_mode():
        for m in members:
            try:
                out = m.forward(x)
            except SpecError:  # already a clear message (e.g. bad preprocessing)
                raise
            except Exception as exc:
                raise SpecError(f"teacher {m.name!r} fails on the transfer set's inputs {tuple(x.shape)}: {exc}") from exc
            if out.ndim != 2:
                raise SpecError(f"teacher {m.name!r} returns shape {tuple(out.shape)}, expected [batch, classes]")
            (widths if m.name in specialists else counts)[m.name] = int(out.shape[1])
    if len(set(counts.values())) > 1 or (declared is not None and declared not in counts.values()):
        shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
        extra = f"; the ensemble/data declares {declared}" if declared is not None else ""
        raise ClassCountMismatchError(f"ensemble members disagree on the class count ({shown}{extra})")
    c = next(iter(counts.values()))
    for name, width in widths.items():
        classes = specialists[name]
        if width != len(classes) + 1:
            raise ClassCountMismatchError(f"specialist {name!r} returns {width} outputs; its {len(classes)} classes "
                                          f"and a dustbin make {len(classes) + 1}")
        if max(classes) >= c:
            raise ClassCountMismatchError(f"specialist {name!r} names class {max(classes)}; the generalist predicts "
                                          f"{c} classes")
        if len(classes) >= c:
            raise ClassCountMismatchError(f"specialist {name!r} takes every one of the {c} classes: its dustbin "
                                          "would be empty")
    return c


@dataclass
class PreparedJob:
    """Everything a process needs to write chunks of one job."""

    spec: JobSpec
    members: list[LoadedModel]
    data: TransferSet
    meta: StoreMeta
    device: torch.device
    channels_last: bool = False
    roots: Sequence[str | Path] | None = None  # where the job's paths may lie (engines' reference weights)
    allow_code: bool = False

    def close(self) -> None:
        """Let go of what members hold beyond memory: engines' connections, an in-process engine."""
        for m in self.members:
            close = getattr(m, "close", None)
            if close is not None:
                close()

    @property
    def ensemble(self) -> Ensemble:
        return Ensemble(self.members, self.meta.num_classes, self.device, self.spec.precision, self.channels_last,
                        self.spec.teachers.specialists)


def store_meta(spec: JobSpec, members: list[LoadedModel], data, num_classes: int, names: list[str] | None, *, base=None,
               **records: Any) -> StoreMeta:
    """The store's metadata: the job, its teachers' and transfer set's provenance, and ``records`` (views,
    targets, features, specialists, sequence)."""
    base = base or data
    return StoreMeta(
        software_version=darkstore.__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        job_key=spec.job_key([m.sha256 for m in members], data.fingerprint),
        num_rows=len(data),
        num_classes=num_classes,
        class_names=names,
        chunk_rows=spec.chunk_rows,
        dtype=spec.dtype,
        compressor=spec.compressor,
        combine=spec.combine,
        temperature=spec.temperature,
        keep_members=spec.keep_members,
        teachers=[teacher_record(m) for m in members],
        transfer_set=TransferSetRecord(spec=base.spec.model_dump(mode="json"), fingerprint=base.fingerprint,
                                       num_samples=len(base)),
        job=spec.model_dump(mode="json"),
        **records,
    )


def teacher_record(m: LoadedModel) -> TeacherRecord:
    return TeacherRecord(name=m.name, arch=m.spec.arch or m.spec.factory or m.format, format=m.format,
                         weights=str(m.weights_path) if m.weights_path else None, sha256=m.sha256,
                         num_params=m.num_params, spec=m.spec.model_dump(mode="json"))


def feature_records(spec: JobSpec, members: list[LoadedModel], data, dev: torch.device) -> list[FeatureRecord]:
    """The job's feature records with their stored shapes, measured on the first rows' forward pass."""
    taps = FeatureTaps(members, spec.features)
    try:
        x, _ = data.get_batch(np.arange(min(2, len(data))))
        with torch.inference_mode():
            for m in members:
                m.forward(x.to(dev))
        shapes = taps.shapes()
    finally:
        taps.close()
    return [r.model_copy(update={"shape": shape}) for r, shape in zip(spec.features, shapes)]


def specialists_record(spec: JobSpec) -> SpecialistsRecord | None:
    t = spec.teachers
    if t.specialists is None:
        return None
    return SpecialistsRecord(generalist=t.generalist, top_n=spec.specialist_top_n,
                             specialists=[SpecialistRecord(name=m.name, classes=t.specialists[m.name])
                                          for m in t.members if m.name in t.specialists])


def targets_record(spec: JobSpec, num_classes: int, unit: str = "classes") -> TargetsRecord | None:
    """The store's targets record (None: dense); top-k of every class (token) is refused."""
    t = spec.targets
    if t.spec.every_class:
        return None
    t.spec.check_size(t, num_classes, unit)
    return t


def in_store_order(data, meta: StoreMeta):
    """The rows of ``meta``'s store: the transfer set (or its views) in the store's recorded row order and
    recipe version — the store's, not the spec's, so a store resumed by another darkstore keeps both."""
    order = sample_order(meta)
    if isinstance(data, ViewSet):
        return ViewSet(data.base, data.aug.at_version(meta.views.version), meta.layout, order)
    return data if order is None else Reordered(data, order)


def identify(spec: JobSpec, *, allow_code: bool = False, roots: Sequence[str | Path] | None = None,
             data=None, fingerprints: FingerprintPolicy | None = None) -> str:
    """The job key without loading any model: weight files are hashed, the data fingerprinted."""
    hashes = []
    for m in spec.teachers.members:
        if m.engine is not None and m.weights is None and m.engine.url is None:
            hashes.append(engine_digest(m, None, roots))
            continue
        if m.engine is not None and m.weights is None:
            server = VllmServer.connect(m, dict(os.environ))
            try:
                hashes.append(engine_digest(m, server.describe(), roots))
            finally:
                server.close()
            continue
        if m.weights is None:
            hashes.append(None)
            continue
        path = resolve(m.weights, roots=roots)
        if m.format == "transformers":
            hashes.append(folder_digest(m.label, path))
            continue
        if not path.is_file():
            raise WeightsNotFoundError(f"weights of {m.label!r} not found: {path}")
        hashes.append(sha256_file(path))
    data = data or open_transfer_set(spec.data, allow_code=allow_code, roots=roots, fingerprints=fingerprints,
                                     prompts=spec.responses and spec.responses.n)
    return spec.job_key(hashes, data.fingerprint)
