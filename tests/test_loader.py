"""The streaming student loader: exactly once per epoch across workers and ranks, seeded order,
mid-epoch resume, and batches that carry the right targets and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage import open_store
from student_trainer.loader import make_loader
from teacher_service.generate import generate

from .conftest import MEMBERS, job, make_arrays, make_ensemble

N, CHUNK = 1000, 64  # 16 chunks, the last one partial


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    data = make_arrays(tmp / "x.npz", n=N)
    ens = make_ensemble(tmp / "t", MEMBERS[:2])
    w = generate(job(ens, data, chunk_rows=CHUNK, keep_members=True), tmp / "store")
    return open_store(w.path)


def epoch_rows(store, rows, *, workers, rank=0, world=1, seed=0, epoch=0, batch=50, buffer=3):
    loader = make_loader(store, rows, batch_size=batch, seed=seed, num_workers=workers, rank=rank, world_size=world,
                         buffer_chunks=buffer)
    return [b.rows.numpy() for b in loader.epoch(epoch)]


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("world", [1, 2])
def test_every_row_exactly_once_per_epoch(store, workers, world):
    rows = np.arange(N)
    seen = np.concatenate([np.concatenate(epoch_rows(store, rows, workers=workers, rank=r, world=world))
                           for r in range(world)])
    assert len(seen) == N and np.array_equal(np.sort(seen), rows)
    # and with a subset (a train split): exactly that subset
    subset = np.random.default_rng(1).choice(N, 700, replace=False)
    seen = np.concatenate([np.concatenate(epoch_rows(store, subset, workers=workers, rank=r, world=world))
                           for r in range(world)])
    assert np.array_equal(np.sort(seen), np.sort(subset))


def test_order_is_seeded_and_changes_with_epoch_and_seed(store):
    rows = np.arange(N)
    a = np.concatenate(epoch_rows(store, rows, workers=2, seed=3, epoch=1))
    b = np.concatenate(epoch_rows(store, rows, workers=2, seed=3, epoch=1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.concatenate(epoch_rows(store, rows, workers=2, seed=3, epoch=2)))
    assert not np.array_equal(a, np.concatenate(epoch_rows(store, rows, workers=2, seed=4, epoch=1)))
    assert not np.array_equal(a, rows)  # shuffled at all
    # rows are mixed across chunks within a window, not just chunk order
    first = epoch_rows(store, rows, workers=1, seed=3, epoch=1, buffer=3)[0]
    assert len(np.unique(first // CHUNK)) > 1


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resumed_epoch_yields_exactly_the_rest(store, workers):
    rows = np.arange(N)
    loader = make_loader(store, rows, batch_size=40, seed=5, num_workers=workers, buffer_chunks=2)
    it = loader.epoch(3)
    before = [next(it).rows.numpy() for _ in range(9)]
    state = loader.state_dict()
    del it
    fresh = make_loader(store, rows, batch_size=40, seed=5, num_workers=workers, buffer_chunks=2)
    fresh.load_state_dict(state)
    after = [b.rows.numpy() for b in fresh.epoch(3)]
    got = np.concatenate(before + after)
    assert len(got) == N and np.array_equal(np.sort(got), rows)
    full = np.concatenate([b.rows.numpy() for b in make_loader(store, rows, batch_size=40, seed=5,
                                                                  num_workers=workers, buffer_chunks=2).epoch(3)])
    rest = np.setdiff1d(full, np.concatenate(before))
    assert np.array_equal(np.sort(np.concatenate(after)), np.sort(rest))
    if workers <= 1:  # one shard: even the order is the uninterrupted one
        assert np.array_equal(got, full)
    # a state from another layout is refused rather than silently misread
    other = make_loader(store, rows, batch_size=40, seed=5, num_workers=4)
    with pytest.raises(ValueError, match="same ranks, workers and seed"):
        other.load_state_dict(state)


def test_batches_carry_the_stored_targets_and_their_inputs(store):
    rows = np.arange(N)
    full = store.read_all(members=True)
    with np.load(store.meta.transfer_set.spec["path"]) as z:
        x_all = z["x"]
    loader = make_loader(store, rows, batch_size=64, seed=0, num_workers=2, members=True)
    n = 0
    for b in loader.epoch(0):
        r = b.rows.numpy()
        np.testing.assert_array_equal(b.logits.numpy(), full.logits[r])
        assert b.logits.dtype == torch.float16  # store dtype on the wire; cast on the device
        np.testing.assert_array_equal(b.labels.numpy(), full.labels[r])
        np.testing.assert_array_equal(b.members.numpy(), full.members[:, r].transpose(1, 0, 2))
        np.testing.assert_array_equal(b.x.numpy(), x_all[full.index[r]])
        n += len(r)
    assert n == N


@pytest.mark.parametrize("readahead", [True, False])
def test_sparse_rows_spanning_many_chunks_in_one_batch(store, readahead):
    """A held-out split read in order: one batch spans more chunks than the read-ahead bound."""
    rows = np.sort(np.random.default_rng(2).choice(N, 120, replace=False))  # ~8 rows per chunk, all 16 chunks
    loader = make_loader(store, rows, batch_size=100, shuffle=False, buffer_chunks=1, readahead=readahead)
    batches = list(loader.epoch(0))
    assert len(np.unique(batches[0].rows.numpy() // CHUNK)) > 2 * 1  # more chunks than 2 × buffer_chunks
    got = np.concatenate([b.rows.numpy() for b in batches])
    assert np.array_equal(got, rows)
    ref = store.read_field("logits")[rows]
    assert np.array_equal(np.concatenate([b.logits.numpy() for b in batches]), ref)


def test_a_store_that_fits_one_window_is_read_once_and_kept_across_epochs(store, monkeypatch):
    """When every chunk fits one shuffle window (an epoch holds them all at once anyway), the loader reads each
    chunk once per process and serves later epochs from memory; a smaller window reads the store every epoch.
    Either way every batch carries the stored targets."""
    from storage.reader import StoreReader

    read: list[int] = []
    real = StoreReader.read_chunk_parts

    def spy(self, chunks, *args, **kwargs):
        read.extend(chunks)
        return real(self, chunks, *args, **kwargs)

    monkeypatch.setattr(StoreReader, "read_chunk_parts", spy)
    full = store.read_all()
    for buffer, epochs, reads in ((16, 3, 1), (3, 2, 2)):
        loader = make_loader(store, np.arange(N), batch_size=50, seed=1, buffer_chunks=buffer)
        read.clear()  # making a loader reads labels and indices whole, once
        for e in range(epochs):
            for b in loader.epoch(e):
                assert np.array_equal(b.logits.numpy(), full.logits[b.rows.numpy()])
        assert sorted(read) == sorted(list(range(16)) * reads), buffer


def test_labels_and_indices_are_read_once_and_shared_with_the_workers(store, tmp_path, monkeypatch):
    """Per-row labels and sample indices are read whole once, in the process that makes the loader; its forked
    workers share them rather than each reading its own copy. The workers' batches still carry the stored labels."""
    import os

    from storage.reader import StoreReader

    log = tmp_path / "reads"
    real = StoreReader.read_field

    def read_field(self, name):
        with open(log, "a") as f:  # appended by whichever process reads
            f.write(f"{os.getpid()} {name}\n")
        return real(self, name)

    monkeypatch.setattr(StoreReader, "read_field", read_field)
    batches = list(make_loader(store, np.arange(N), batch_size=50, seed=1, num_workers=2).epoch(0))
    reads = [line.split() for line in log.read_text().splitlines()]
    assert sorted(name for _, name in reads) == ["index", "labels"]
    assert {int(pid) for pid, _ in reads} == {os.getpid()}
    labels = store.read_field("labels")
    assert len({b.shard for b in batches}) == 2  # both workers made batches
    for b in batches:
        assert np.array_equal(b.labels.numpy(), labels[b.rows.numpy()])
