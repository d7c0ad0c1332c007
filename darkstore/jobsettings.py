"""A teacher job's settings besides its teachers and data: how the ensemble is combined, how the teachers run
and how the store is encoded. Torch- and zarr-free, so `darkstore generate` builds its options from these
fields (one declaration each) and ``--help`` stays fast; :class:`teacher_service.spec.JobSpec` inherits them and
:mod:`storage.schema` records the encoding choices."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float16", "float32"]
Compressor = Literal["zstd", "blosc", "none"]
Combine = Literal["geometric", "arithmetic", "specialists"]
Precision = Literal["float32", "bfloat16", "float16"]
RowOrder = Literal["shuffled", "natural"]


class JobSettings(BaseModel):
    """The settings `generate`, a job file, REST and Celery share (unknown fields rejected)."""

    model_config = ConfigDict(extra="forbid")
    combine: Combine = Field("geometric", description="how the teachers' outputs combine: geometric (mean of log-"
                             "probabilities) | arithmetic (mean of probabilities) | specialists (a generalist and the "
                             "specialists the ensemble names, Hinton et al.'s combination)")
    temperature: float = Field(1.0, gt=0, le=100, description="generation temperature (matters for arithmetic)")
    dtype: Dtype = Field("float16", description="stored value type")
    compressor: Compressor = Field("zstd", description="chunk codec")
    chunk_rows: int | None = Field(None, ge=1, le=1 << 20, description="rows per chunk, the unit of work and commit "
                                   "(default: 1,024 rows of classes; token rows of about 65,536 positions)")
    keep_members: bool = Field(False, description="also store each teacher's logits")
    precision: Precision = Field("float32", description="teacher forward precision (autocast); part of the job's "
                                 "identity")
    specialist_top_n: int = Field(1, ge=1, description="combine specialists: a row's specialists are those whose "
                                  "classes meet the generalist's top n classes")
    row_order: RowOrder = Field(
        "shuffled", description="shuffled (default): samples are stored in a seeded random order, so a store made "
        "from a class-sorted set (an image folder) streams well-mixed batches; natural: transfer-set order. Not "
        "part of the job's identity: both orders hold the same targets for every sample")
