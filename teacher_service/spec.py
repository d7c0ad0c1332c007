"""Job specs: what the CLI, the HTTP API and Celery all accept (pydantic, unknown fields rejected)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from darkstore.data import DataSpec, parse_data_spec
from darkstore.models import ModelSpec
from darkstore.specfile import load_spec_file
from darkstore.views import AugmentSpec
from darkstore.errors import SpecError
from darkstore.jobsettings import JobSettings
from storage.kinds import kind_for_data
from storage.schema import FeatureRecord, ResponsesRecord, TargetsRecord


class EnsembleSpec(BaseModel):
    """The teachers. Relative weight paths in a spec file resolve against the file."""

    model_config = ConfigDict(extra="forbid")
    num_classes: int | None = Field(None, gt=1)
    class_names: list[str] | None = None
    members: list[ModelSpec] = Field(min_length=1)
    specialists: dict[str, list[int]] | None = Field(
        None, description="for combine: specialists — each specialist member's classes, in its output order (its "
        "last output is the dustbin: every other class); the one member not named is the generalist")

    @model_validator(mode="after")
    def _names(self) -> "EnsembleSpec":
        named = []
        for i, m in enumerate(self.members):
            named.append(m if m.name else m.model_copy(update={"name": f"{m.label}_{i}"}))
        names = [m.name for m in named]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        self.members = named
        if self.class_names is not None and self.num_classes not in (None, len(self.class_names)):
            raise ValueError("class_names and num_classes disagree")
        if self.specialists is not None:
            self._check_specialists(names)
        return self

    def _check_specialists(self, names: list[str]) -> None:
        unknown = sorted(set(self.specialists) - set(names))
        if unknown:
            raise ValueError(f"specialists names {unknown[0]!r}, not a member ({', '.join(names)})")
        generalists = [n for n in names if n not in self.specialists]
        if len(generalists) != 1:
            raise ValueError(f"with specialists, exactly one member is the generalist (not named under specialists); "
                             f"here {len(generalists)}: {', '.join(generalists) or 'none'}")
        members = []
        for m in self.members:
            classes = self.specialists.get(m.name)
            if classes is None:
                members.append(m)
                continue
            if len(set(classes)) != len(classes) or min(classes) < 0 or (
                    self.num_classes is not None and max(classes) >= self.num_classes):
                raise ValueError(f"specialist {m.name}: its classes must be distinct class numbers")
            if m.num_classes not in (None, len(classes) + 1):
                raise ValueError(f"specialist {m.name} predicts {len(classes)} classes and a dustbin: "
                                 f"num_classes {len(classes) + 1}, not {m.num_classes}")
            members.append(m.model_copy(update={"num_classes": len(classes) + 1}))
        self.members = members

    @property
    def generalist(self) -> str | None:
        if self.specialists is None:
            return None
        return next(m.name for m in self.members if m.name not in self.specialists)

    @classmethod
    def from_file(cls, path: str | Path) -> "EnsembleSpec":
        path = Path(path)
        spec = _validate(cls, load_spec_file(path), str(path))
        return spec.rebased(path.resolve().parent)

    def rebased(self, base: Path) -> "EnsembleSpec":
        return self.model_copy(update={"members": [m.rebased(base) for m in self.members]})


class JobSpec(JobSettings):
    """One generation job: teachers over a transfer set, with the settings of :class:`JobSettings`."""

    model_config = ConfigDict(extra="forbid")
    teachers: EnsembleSpec
    data: DataSpec
    augment: AugmentSpec | None = Field(
        None, description="K recorded views per sample (row = (sample, view)); see darkstore.views")
    targets: TargetsRecord = Field(
        default_factory=TargetsRecord, description="the targets' form: dense (default: every class), topk:K (the "
        "K largest values and the tail's mass) or sampled:K (K classes drawn from the ensemble's distribution; "
        "sampled:K@T draws at temperature T); a string or an object {form, k, temperature, seed}")
    responses: ResponsesRecord | None = Field(
        None, description="the teachers write responses to the transfer set's prompts (a chat set, or records with "
        "a prompt column) instead of scoring its own: {max_new_tokens, temperature, top_p, n, stop, seed}; the "
        "targets at each written token are the distribution it was drawn from")
    features: list[FeatureRecord] = Field(
        default_factory=list, description="teacher layers to keep per row (FitNets' hints): 'TEACHER:LAYER' or "
        "{teacher, layer, pool, project, seed}; pool averages a [C, H, W] output to [C, pool, pool], project maps "
        "it to that many dimensions with a fixed seeded Gaussian matrix")

    @model_validator(mode="after")
    def _rows(self) -> "JobSpec":
        kind = kind_for_data(self.data.kind)
        if self.chunk_rows is None:
            self.chunk_rows = kind.default_chunk_rows(self.data)
        self.targets = kind.targets_for(self.targets)
        kind.check_job({"augment (recorded views)": self.augment is not None, "features (hints)": bool(self.features),
                        "keep_members": self.keep_members, "combine specialists": self.combine == "specialists"})
        if self.responses is not None and not kind.writes_responses:
            raise ValueError(f"responses: teachers write responses to text prompts; a transfer set of kind "
                             f"{self.data.kind} holds none")
        if self.responses is not None and any(m.engine is not None for m in self.teachers.members):
            raise ValueError("responses: engine teachers score given tokens; they do not write responses here "
                             "(run the job with local teachers)")
        return self

    @model_validator(mode="after")
    def _features(self) -> "JobSpec":
        names = {m.name for m in self.teachers.members}
        seen = set()
        for f in self.features:
            if f.teacher not in names:
                raise ValueError(f"feature {f.name}: no teacher named {f.teacher!r} (teachers: {', '.join(sorted(names))})")
            if f.shape is not None:
                raise ValueError(f"feature {f.name}: shape is measured when the job is prepared, not given")
            if f.name in seen:
                raise ValueError(f"feature {f.name} is named twice")
            seen.add(f.name)
        return self

    @model_validator(mode="after")
    def _specialists(self) -> "JobSpec":
        if (self.combine == "specialists") != (self.teachers.specialists is not None):
            raise ValueError("combine specialists needs the ensemble's specialists: (each specialist member's "
                             "classes), and specialists: needs combine specialists")
        return self

    @model_validator(mode="after")
    def _sparse_options(self) -> "JobSpec":
        self.targets.spec.check_job(self.targets, combine=self.combine, temperature=self.temperature,
                                    keep_members=self.keep_members, num_classes=self.teachers.num_classes)
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "JobSpec":
        path = Path(path)
        raw = load_spec_file(path)
        if isinstance(raw, dict):
            base = path.resolve().parent
            if isinstance(raw.get("teachers"), str):
                raw["teachers"] = EnsembleSpec.from_file(base / raw["teachers"]).model_dump()
            if isinstance(raw.get("data"), str):
                raw["data"] = parse_data_spec(base / raw["data"]).model_dump()
        return _validate(cls, raw, str(path)).rebased(path.resolve().parent)

    def rebased(self, base: str | Path) -> "JobSpec":
        """Relative paths (weights, data) made relative to ``base``: the spec file's folder
        for the CLI, the first data root for the service."""
        from darkstore.data import _rebase

        base = Path(base)
        return self.model_copy(update={"teachers": self.teachers.rebased(base), "data": _rebase(self.data, base)})

    def identity(self, weight_hashes: Sequence[str | None], data_fingerprint: str) -> dict[str, Any]:
        """What makes two jobs the same: teachers by weight hash (not path, not name; an engine's by its local
        weights, else by the model it reports), data by content fingerprint, and the options."""
        return {
            "teachers": [
                {**m.model_dump(include={"arch", "arch_kwargs", "num_classes", "factory", "preprocess"}),
                 "format": m.format, "sha256": h, **({"key_map": m.key_map} if m.key_map else {}),
                 **({"engine": m.engine.kind} if m.engine else {})}
                for m, h in zip(self.teachers.members, weight_hashes)
            ],
            "num_classes": self.teachers.num_classes,
            "data": data_fingerprint,
            "combine": self.combine,
            # the geometric mean does not depend on T: the same store serves every T
            "temperature": self.temperature if self.combine == "arithmetic" else None,
            "dtype": self.dtype,
            "compressor": self.compressor,
            "chunk_rows": self.chunk_rows,
            "keep_members": self.keep_members,
            # only when set, so the keys of float32 jobs stay what they were before this option existed
            **({"precision": self.precision} if self.precision != "float32" else {}),
            **({"augment": self.augment.model_dump(mode="json")} if self.augment is not None else {}),
            **({"targets": self.targets.model_dump(mode="json")} if not self.targets.spec.every_class else {}),
            **({"responses": self.responses.model_dump(mode="json", exclude={"prompts", "dropped"})}
               if self.responses is not None else {}),
            **({"features": [f.model_dump(mode="json", exclude={"shape"}) for f in self.features]}
               if self.features else {}),
            **({"specialists": self.teachers.specialists, "top_n": self.specialist_top_n}
               if self.combine == "specialists" else {}),
        }

    def job_key(self, weight_hashes: Sequence[str | None], data_fingerprint: str) -> str:
        blob = json.dumps(self.identity(weight_hashes, data_fingerprint), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _validate(cls, raw: Any, where: str):
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"invalid {cls.__name__} in {where}:\n{_errors(exc)}") from exc


def _errors(exc: ValidationError) -> str:
    return "\n".join(f"  {'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
