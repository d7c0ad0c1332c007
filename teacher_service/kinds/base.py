"""The interface every row kind implements on the teachers' side (see :mod:`teacher_service.kinds`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from storage import StoreMeta, StoreWriter

from ..prepared import PreparedJob


class TeacherKind:
    name: str = ""

    def prepare(self, spec: Any, data: Any, *, device: torch.device, allow_code: bool, roots: Any,
                max_params: int | None, channels_last: bool) -> PreparedJob:
        """Load the teachers, check them against each other and the transfer set, and build the store's
        metadata (its row order is set afterwards, the same for every kind)."""
        raise NotImplementedError

    def run(self, job: PreparedJob, writer: StoreWriter, chunks: Sequence[int], *, batch_size: int,
            on_rows: Callable[[int], None] | None, on_chunk: Callable[[int, int], None] | None,
            should_stop: Callable[[], bool] | None, **options: Any) -> int:
        """Compute and commit ``chunks`` (none committed yet); returns the rows written."""
        raise NotImplementedError

    def default_batch(self, meta: StoreMeta) -> int:
        """Rows per forward pass when none is asked for."""
        raise NotImplementedError
