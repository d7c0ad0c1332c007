"""Check that a transfer set is the one a store was generated from (rows are joined with their
inputs by :mod:`student_trainer.loader`)."""

from __future__ import annotations



from darkstore.data import TransferSet
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
