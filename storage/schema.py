"""Schema v2 of a darkstore store: a Zarr v3 group whose arrays are declared, once, in :mod:`storage.fields`
(the docs' store-fields page is generated from that table), with attributes validated by :class:`StoreMeta`.

Every array is chunked by ``chunk_rows`` rows, so chunk *i* of each array holds
exactly rows ``[i*chunk_rows, (i+1)*chunk_rows)``: one unit of work, retry and
commit. ``done`` and ``stats`` have one chunk per element so that two writers
never touch the same object. Attributes live under the ``darkstore`` key and are
validated by :class:`StoreMeta`.

Accuracies are *derived* from ``stats`` by the reader rather than written as
attributes at the end: a store filled by many workers then needs no final
"finalise" step that a crash could skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from darkstore.jobsettings import Combine, Compressor, Dtype

from .forms import TargetsRecord
from .kinds import Kind, kind_of

SCHEMA_VERSION = 2
#: versions this darkstore opens: 1 (no chunk checksums) and 2
READABLE_VERSIONS = (1, 2)
ATTR_KEY = "darkstore"



class TeacherRecord(BaseModel):
    """Provenance of one ensemble member."""

    model_config = ConfigDict(extra="forbid")
    name: str
    arch: str
    format: str = Field(description="safetensors | state_dict | torchscript | export | factory | none")
    weights: str | None = None
    sha256: str | None = None
    num_params: int
    spec: dict[str, Any] = Field(default_factory=dict)


class TransferSetRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any]
    fingerprint: str
    num_samples: int


class ViewsRecord(BaseModel):
    """What a views store records about its K views per sample (written by ``darkstore.views.views_record``;
    the recipe itself is validated by ``darkstore.views.recipe_for_replay`` before any replay)."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(description="the recipe version: how parameters are drawn and pixels made (1: torchvision "
                         "row by row; 2: batched kernels on the generating device)")
    views: int = Field(ge=1, description="K: rows per sample")
    recipe: dict[str, Any] = Field(description="the augmentation recipe, as the job gave it")
    param_names: list[str] = Field(description="the columns of `view_params`")
    input_shape: list[int]
    pixel_digest: str = Field(description="sha256 of the recipe applied to a fixed probe: equal digests, equal pixels")
    torchvision: str | None = Field(None, description="the torchvision version that made the views")
    pixel_sketch: list[float] | None = Field(None, description="version 2: a CountSketch of the probe's pixels, to "
                                             "bound how far another device's replay is from them")
    pixel_rms: float | None = Field(None, description="version 2: the RMS of the probe's pixels")
    device: str | None = Field(None, description="version 2: the device type that made the views")
    torch: str | None = Field(None, description="version 2: the torch version that made the views")

    @property
    def clean_view0(self) -> bool:
        """Whether view 0 of every sample is the untouched input (the recipe's default)."""
        return bool(self.recipe.get("clean_view0", True))


@dataclass(frozen=True)
class RowLayout:
    """Where a store row's input comes from — the one place this rule is written.

    Row ``r`` is view ``r % K`` of the sample at *position* ``r // K``; the ``index`` field names the
    sample at each position (the shuffled row order permutes positions, never views). A store
    without views has K = 1: row = position."""

    k: int = 1

    def position(self, rows: Any) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) // self.k

    def view(self, rows: Any) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) % self.k

    def row(self, positions: Any, view: int = 0) -> np.ndarray:
        """The row holding ``view`` of the sample at each position."""
        return np.asarray(positions, dtype=np.int64) * self.k + view

    def first_row(self, rows: Any) -> np.ndarray:
        """For each row, the row of view 0 of the same sample."""
        return self.row(self.position(rows))


class FeatureRecord(BaseModel):
    """One teacher layer whose output a store keeps (FitNets' hints), and the fixed reduction applied to it.

    A job names ``teacher`` (a member's name) and ``layer`` (a module name inside it, as in
    ``named_modules()``); ``pool`` average-pools a [C, H, W] output to [C, pool, pool] (adaptive, so any input
    size works); ``project`` then maps the flattened values to ``project`` dimensions with a fixed Gaussian
    matrix drawn from ``seed`` (scaled by 1/√project). ``shape`` is what one row stores, filled in when the
    job is prepared. Stored in the store's float dtype, flattened and laid side by side in ``features``."""

    model_config = ConfigDict(extra="forbid")
    teacher: str = Field(min_length=1)
    layer: str = Field(min_length=1)
    pool: int | None = Field(None, ge=1, le=64, description="adaptive average pooling to pool x pool")
    project: int | None = Field(None, ge=1, le=1 << 16, description="random projection to this many dimensions")
    seed: int = 0
    shape: list[int] | None = Field(None, description="per-row shape as stored (after the reduction)")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        teacher, sep, layer = v.strip().partition(":")
        if not sep or not teacher or not layer:
            raise ValueError(f"feature {v!r}: write TEACHER:LAYER (a member's name and a module name inside it)")
        return {"teacher": teacher, "layer": layer}

    @property
    def name(self) -> str:
        return f"{self.teacher}:{self.layer}"

    @property
    def size(self) -> int:
        return math.prod(self.shape or ())

    def reduction(self) -> str:
        parts = ([f"avgpool {self.pool}x{self.pool}"] if self.pool else []) + \
            ([f"projection to {self.project} (seed {self.seed})"] if self.project else [])
        return ", then ".join(parts) or "none"


class TokenizerRecord(BaseModel):
    """The tokenizer a sequence store's token ids come from."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="where it was loaded from (a local directory or tokenizer.json)")
    fingerprint: str = Field(description="sha256 of its canonical JSON: vocabulary, merges, normalisation, "
                             "pre-tokenisation and special tokens")
    vocab_size: int = Field(gt=1, description="token ids 0 .. vocab_size - 1, added tokens included")
    eos_id: int | None = Field(None, description="the token ending each document or record")
    pad_id: int | None = Field(None, description="the token filling a padded record (no loss there)")


class ChatRecord(BaseModel):
    """A store whose rows are conversations rendered with a chat template, a loss on the assistant's turns."""

    model_config = ConfigDict(extra="forbid")
    template: str = Field(description="the chat template (Jinja) the conversations were rendered with")
    source: str = Field(description="where the template was read: the tokenizer's configuration or a file")
    sha256: str = Field(description="the template text's sha256 (part of the transfer set's fingerprint)")
    turns: Literal["all", "last"] = Field(description="which assistant turns carry a loss")
    overflow: Literal["truncate", "drop"] = Field(description="what became of a conversation longer than a row")
    conversations: int = Field(ge=0, description="conversations read")
    truncated: int = Field(0, ge=0, description="conversations cut to the row")
    dropped: int = Field(0, ge=0, description="conversations left out (longer than a row, or no assistant token "
                         "inside it)")


class ResponsesRecord(BaseModel):
    """Responses the teachers write to the transfer set's prompts: how they were decoded. Each row is one
    response (prompt ``index // n``, sample ``index % n``); its written tokens carry the loss and their
    targets are the ensemble's distribution each was drawn from."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(256, ge=1, description="the most tokens a response is written (and a row holds "
                                "what fits)")
    temperature: float = Field(1.0, ge=0.0, description="decoding temperature over the stored distribution "
                               "(0: greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: draw from the smallest set of tokens "
                         "holding this much probability")
    n: int = Field(1, ge=1, le=1024, description="responses per prompt")
    stop: list[str] = Field(default_factory=list, description="strings that end a response (the token completing "
                            "one is its last; the tokenizer's EOS always ends one)")
    seed: int = Field(0, ge=0, description="draws are a function of (seed, prompt, sample, step): a resumed or "
                      "sharded job writes the same tokens")
    prompts: int | None = Field(None, ge=0, description="prompts written to (set when the job is prepared)")
    dropped: int | None = Field(None, ge=0, description="prompts left out: no room in a row for a response")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("a stop string must not be empty")
        return v


class SequenceRecord(BaseModel):
    """A store whose rows are fixed-length token sequences: per-position targets, the tokens beside them."""

    model_config = ConfigDict(extra="forbid")
    length: int = Field(ge=1, description="positions per row (L); `tokens` holds L + 1 ids per row")
    tokenizer: TokenizerRecord
    packing: Literal["packed", "records", "chat"] = Field(
        description="packed: documents joined by EOS and cut into rows; records: one record per row, padded, its "
        "prompt masked; chat: one conversation per row, rendered with its chat template, a loss on the "
        "assistant's turns")
    positions: int = Field(ge=0, description="positions with a loss in the whole store")
    text_bytes: int = Field(ge=0, description="UTF-8 bytes of the text the rows were made from")
    teacher_stride: int = Field(1, ge=1, description="each teacher's own statistics (top-1, NLL) cover position "
                                "p of row r where p - r is a multiple of teacher_stride (those with a loss); the "
                                "ensemble's cover all")
    chat: ChatRecord | None = Field(None, description="chat: the template and what did not fit")
    responses: ResponsesRecord | None = Field(None, description="rows written by the teachers: the decoding "
                                              "settings (None: the transfer set's own tokens, scored)")


class EngineMemberRecord(BaseModel):
    """One ensemble member served by an inference engine, as the engine reported itself."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the ensemble member")
    engine: str = Field(description="the engine and its version, e.g. vllm 0.32.0")
    model: str = Field(description="the served model's name")
    root: str | None = Field(None, description="what the engine loaded: its model path or hub name")
    max_model_len: int | None = Field(None, description="the longest prompt and answer the server takes")


class EngineRecord(BaseModel):
    """A store whose teachers are served by inference engines: their values are normalised log-probabilities
    at T = 1 (not logits), K per position, the tail's mass ``log1p(-Σp)`` of what was returned."""

    model_config = ConfigDict(extra="forbid")
    values: Literal["logprobs"] = "logprobs"
    members: list[EngineMemberRecord] = Field(min_length=1)
    tail_floor: float = Field(description="log of the smallest tail mass the engine's float32 values resolve "
                              "(K · 2^-24); a tail below it is stored at it and counted in engine_counts")


class SpecialistRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the ensemble member")
    classes: list[int] = Field(min_length=1, description="the classes it predicts, in its output order; its last "
                                                         "output is the dustbin (every other class)")


class SpecialistsRecord(BaseModel):
    """The ``specialists`` combine rule: a generalist and specialists, combined per row into the distribution
    that minimises KL(generalist ‖ q) + Σ KL(specialist ‖ q on its classes and dustbin) over the specialists
    whose classes meet the generalist's ``top_n`` (teacher_service.specialists)."""

    model_config = ConfigDict(extra="forbid")
    generalist: str
    specialists: list[SpecialistRecord] = Field(min_length=1)
    top_n: int = Field(1, ge=1)


class SpecialistOfRecord(BaseModel):
    """A store derived from a generalist's for training one specialist: the generalist's targets collapsed onto
    ``classes`` and a dustbin (last), labels remapped, the rows of the specialist's classes repeated ``repeat``
    times so they make about half of an epoch (the paper's oversampling)."""

    model_config = ConfigDict(extra="forbid")
    generalist_job_key: str
    generalist_store: str
    classes: list[int] = Field(min_length=1)
    repeat: int = Field(ge=1)
    subset_fraction: float = Field(gt=0, lt=1, description="the specialist's classes' share of the generalist's "
                                   "rows before repeating (the dustbin correction is log((1 - f) / f · repeat))")


class StoreMeta(BaseModel):
    """The attributes of a store (``group.attrs['darkstore']``)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    software_version: str
    created_at: str
    job_key: str = Field(description="sha256 of teachers (by weight hash), data fingerprint and options")
    num_rows: int = Field(gt=0)
    num_classes: int = Field(gt=1)
    class_names: list[str] | None = None
    chunk_rows: int = Field(gt=0)
    dtype: Dtype
    compressor: Compressor
    combine: Combine
    temperature: float = Field(gt=0)
    keep_members: bool
    teachers: list[TeacherRecord] = Field(min_length=1)
    transfer_set: TransferSetRecord
    job: dict[str, Any] = Field(default_factory=dict, description="the job spec, enough for a worker to resume")
    views: ViewsRecord | None = Field(
        None, description="recorded views: K, the augmentation recipe, parameter names, pixel digest (rows follow "
                          "`RowLayout`; per-row parameters in `view_params`)")
    row_order: Literal["natural", "shuffled"] = Field(
        "natural", description="natural: rows follow the transfer set; shuffled: samples in the seeded "
                               "permutation `sample_order` (class-sorted sets then stream well-mixed)")
    row_order_seed: int | None = Field(None, description="seed of the shuffled order")
    targets: TargetsRecord | None = Field(None, description="the targets' form (None: dense, as in every store "
                                          "made before sparse targets)")
    checksums: list[str] | None = Field(None, description="schema 2: the row fields whose per-chunk CRC32C the "
                                        "`checksums` array holds, in column order (None: a version-1 store)")
    features: list[FeatureRecord] | None = Field(None, description="teacher layers kept per row (FitNets' "
                                                 "hints), flattened side by side in `features` (None: none)")
    specialists: SpecialistsRecord | None = Field(None, description="combine specialists: the generalist, each "
                                                  "specialist's classes and top_n (None: another rule)")
    specialist_of: SpecialistOfRecord | None = Field(None, description="a store derived from a generalist's to "
                                                     "train one specialist (None: a teachers' store)")
    sequence: SequenceRecord | None = Field(None, description="rows are token sequences: their length, tokenizer "
                                            "and packing (None: rows are samples of classes)")
    engine: EngineRecord | None = Field(None, description="teachers served by inference engines: the values "
                                        "are their log-probabilities (None: the teachers ran in darkstore)")

    @property
    def item_bytes(self) -> int:
        """Bytes of one stored float value (targets, members, features)."""
        return 2 if self.dtype == "float16" else 4

    @property
    def feature_size(self) -> int:
        return sum(f.size for f in self.features or ())

    def feature_slices(self) -> dict[str, tuple[slice, tuple[int, ...]]]:
        """Each kept layer's columns of ``features`` and its per-row shape, by ``teacher:layer``."""
        out, at = {}, 0
        for f in self.features or ():
            out[f.name] = (slice(at, at + f.size), tuple(f.shape or ()))
            at += f.size
        return out

    @property
    def values(self) -> str:
        """What the stored target values are, in words: the geometric mean keeps mean logits (softmax(ℓ / T)
        is the ensemble at every T); the arithmetic mean keeps T_gen × the log of the mean probability at
        T_gen; specialists keep log-probabilities at T = 1; engines' log-probabilities are kept as they come
        (their geometric mean is the members' mean logits up to a constant). All centred: each row's
        (position's) largest is 0."""
        if self.engine is not None:
            return ("log-probabilities at T=1 from the engine" if self.num_members == 1 else
                    f"log-probabilities at T=1 from the engines ({self.combine} mean)")
        return {"geometric": "logits (the members' mean)",
                "arithmetic": f"log-probabilities × T at T={self.temperature:g} (log of the members' mean)",
                "specialists": "log-probabilities at T=1"}[self.combine]

    @property
    def kind(self) -> Kind:
        """The kind of the store's rows (:mod:`storage.kinds`)."""
        return kind_of(self)

    @property
    def positions_per_row(self) -> int:
        """Target positions per row: the sequence length, or 1 for a row of classes."""
        return self.kind.positions(self)

    @property
    def target_form(self) -> str:
        return (self.targets or TargetsRecord()).form

    @property
    def views_per_sample(self) -> int:
        return self.views.views if self.views else 1

    @property
    def layout(self) -> RowLayout:
        return RowLayout(self.views_per_sample)

    @property
    def num_view_params(self) -> int:
        return len(self.views.param_names) if self.views else 0

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.num_rows / self.chunk_rows)

    @property
    def num_members(self) -> int:
        return len(self.teachers)


def sample_order(meta: StoreMeta) -> np.ndarray | None:
    """The samples in store order (position p holds sample ``order[p]``), or None for the natural order.
    Every writer of a store derives the same order from its recorded seed."""
    if meta.row_order == "natural":
        return None
    n = meta.transfer_set.num_samples
    return np.random.default_rng(meta.row_order_seed).permutation(n).astype(np.int64)


def chunk_bounds(i: int, chunk_rows: int, num_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of chunk *i*."""
    start = i * chunk_rows
    if not 0 <= start < num_rows:
        raise IndexError(f"chunk {i} out of range")
    return start, min(start + chunk_rows, num_rows)
