"""Join a store's rows with the transfer-set inputs they were computed on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from darkstore.data import TransferSet, open_transfer_set
from storage import StoreReader
from storage.errors import TransferSetMismatchError


def check_transfer_set(reader: StoreReader, data: TransferSet) -> None:
    """Refuse a transfer set that is not the one the store was generated from."""
    rec = reader.meta.transfer_set
    if len(data) != rec.num_samples:
        raise TransferSetMismatchError(
            f"the transfer set has {len(data)} samples but {reader.path} was generated from {rec.num_samples}"
        )
    if data.fingerprint != rec.fingerprint:
        raise TransferSetMismatchError(
            f"the transfer set's content fingerprint {data.fingerprint[:16]}… differs from the one {reader.path} "
            f"was generated from ({rec.fingerprint[:16]}…): same size, different samples or labels. Pass the "
            "original data, or generate a new store for this data"
        )


@dataclass
class Batch:
    x: torch.Tensor  # [B, ...] float32 inputs
    logits: torch.Tensor  # [B, C] stored teacher logits (float32)
    labels: torch.Tensor  # [B] int64, −1 unlabeled
    rows: np.ndarray  # [B] store row numbers
    members: torch.Tensor | None = None  # [B, M, C]


class StoreTargets:
    """The committed rows of a store, joined with their inputs.

    Targets are held in memory in the store's dtype (float16 halves the cost);
    inputs are read from the transfer set per batch.
    """

    def __init__(
        self,
        reader: StoreReader,
        data: TransferSet | None = None,
        *,
        members: bool = False,
        allow_code: bool = False,
        roots: Sequence[str | Path] | None = None,
    ):
        self.reader = reader
        self.data = data if data is not None else open_transfer_set(
            reader.meta.transfer_set.spec, allow_code=allow_code, roots=roots
        )
        check_transfer_set(reader, self.data)
        chunk = reader.read_all(members=members)
        rows = reader.finished_rows()
        self.rows = rows
        self.logits = chunk.logits
        self.labels = chunk.labels
        self.index = chunk.index
        self.members = chunk.members  # [M, N, C] or None

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, positions: np.ndarray, batch_size: int, *, rng: np.random.Generator | None = None) -> Iterator[Batch]:
        """Batches over ``positions`` (indices into this object's rows), shuffled when ``rng`` is given."""
        order = rng.permutation(positions) if rng is not None else np.asarray(positions)
        for s in range(0, len(order), batch_size):
            yield self.batch(order[s:s + batch_size])

    def batch(self, pos: np.ndarray) -> Batch:
        x, _ = self.data.get_batch(self.index[pos])
        mem = None
        if self.members is not None:
            mem = torch.from_numpy(np.ascontiguousarray(self.members[:, pos].transpose(1, 0, 2))).float()
        return Batch(x, torch.from_numpy(self.logits[pos]).float(), torch.from_numpy(self.labels[pos]), self.rows[pos], mem)
