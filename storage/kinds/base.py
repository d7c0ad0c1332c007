"""The interface every row kind implements on the storage side (see :mod:`storage.kinds`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from darkstore.errors import SpecError

from ..fieldspec import FieldSpec

if TYPE_CHECKING:
    from ..schema import StoreMeta


class Kind:
    name: str = ""
    #: the kind's own row fields (after the targets, members and features) and chunk fields (after ``stats``)
    row_fields: tuple[FieldSpec, ...] = ()
    chunk_fields: tuple[FieldSpec, ...] = ()
    #: what a row's targets are counted in, in words (progress, throughput)
    unit: str = "rows"
    #: whether stored ids (a sparse form's classes or tokens) are kept in ascending order, delta-encoded
    ascending_ids: bool = False
    #: the transfer-set kinds (a job's ``data.kind``) whose rows are of this kind
    data_kinds: tuple[str, ...] = ()
    #: the row fields that hold the rows' own inputs and labels (none: the transfer set holds the inputs)
    input_fields: tuple[str, ...] = ()
    #: whether the teachers can write this kind's rows (responses to prompts) rather than score given ones
    writes_responses: bool = False

    def inputs(self, fields: dict[str, Any]) -> tuple[Any, Any]:
        """(inputs, labels) of rows from their :attr:`input_fields` (taken out of ``fields``)."""
        raise NotImplementedError

    # -- what a job of this kind may ask for (checked when the job spec is read) --
    def default_chunk_rows(self, data_spec: Any) -> int:
        """Rows per chunk where the job names none."""
        return 1024

    def targets_for(self, targets: Any) -> Any:
        """The job's targets record with this kind's defaults."""
        return targets

    def check_job(self, options: dict[str, bool]) -> None:
        """Refuse (ValueError, one line) the store options a job turns on (by name) that this kind has no part in."""

    def check_token_rows(self, meta: "StoreMeta", what: str) -> None:
        """Refuse (SpecError, one line) ``what`` (a format of another tool) where rows are not token sequences."""
        raise SpecError(f"{what} holds token sequences with per-position targets; this store has one target per row "
                        f"({meta.num_rows:,} rows over {meta.num_classes:,} classes)")

    def recognises(self, meta: "StoreMeta") -> bool:
        """Whether ``meta`` describes a store of this kind (its record is there)."""
        raise NotImplementedError

    def length(self, meta: "StoreMeta") -> int | None:
        """The position axis a per-position field gains after its row axis (None: no such axis)."""
        return None

    def positions(self, meta: "StoreMeta") -> int:
        """Target positions per row."""
        return self.length(meta) or 1

    def index_dtype(self, meta: "StoreMeta") -> str:
        """The dtype of stored class (token) numbers."""
        return "int32"

    def codecs(self, field: FieldSpec, meta: "StoreMeta", compressors: Any) -> tuple[Any, Any]:
        """A compressed field's zarr filters and compressors."""
        return None, compressors

    def progress(self, meta: "StoreMeta") -> tuple[str, int, bool]:
        """How generation counts its work: the unit, units per row, and whether it also reports the tokens
        written (``stats[:, 0]`` of the committed chunks)."""
        return self.unit, self.positions(meta), False

    def own_bytes(self, meta: "StoreMeta") -> int:
        """Uncompressed bytes of one row's fields other than its targets."""
        raise NotImplementedError

    def teacher_positions(self, reader: Any) -> int | None:
        """The committed positions each teacher's own statistics cover, where they differ from the labeled
        rows the ensemble's cover (None: the same)."""
        return None

    def perplexity(self, reader: Any) -> dict[str, float] | None:
        """The teachers' perplexity over the committed rows, where the kind measures one."""
        return None

    def check_chunk(self, got: dict[str, Any], meta: "StoreMeta") -> str | None:
        """What is wrong with a committed chunk's fields as read (None: nothing the kind checks)."""
        return None

    def engine_summary(self, reader: Any) -> dict[str, Any] | None:
        """What the store's inference engines reported and how their answers fared (None: no engines)."""
        return None

    def examples(self, reader: Any, n: int) -> list[dict[str, Any]]:
        """A few committed rows as ``inspect`` shows them (none where the kind has nothing to show)."""
        return []

    def record(self, meta: "StoreMeta") -> dict[str, Any] | None:
        """The kind's record as ``inspect`` and the summary show it."""
        return None

    def describe(self, s: dict[str, Any], human: Any) -> list[tuple[str, str]]:
        """``inspect``'s lines about the targets and rows of a store with summary ``s`` (``human``: bytes in
        words)."""
        raise NotImplementedError

    def size_line(self, s: dict[str, Any], human: Any) -> str:
        """``inspect``'s size on disk, per the unit rows are counted in."""
        raise NotImplementedError

    def ensemble_line(self, s: dict[str, Any]) -> tuple[str, str] | None:
        """``inspect``'s line on the ensemble's own quality (None where the store has no labels)."""
        return None

    def teacher_line(self, s: dict[str, Any], name: str) -> str:
        """What ``inspect`` says of teacher ``name``'s own quality (empty where the store does not measure it)."""
        return ""
