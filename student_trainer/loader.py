"""Stream a store's soft targets, joined with their inputs, chunk by chunk.

Each epoch:

1. the store's chunks are put in a seeded order (``seed``, ``epoch``);
2. chunks are dealt round-robin to *shards*: one shard per (DDP rank, DataLoader worker),
   shard ``rank * num_workers + worker``; every chunk goes to exactly one shard;
3. a shard reads its chunks ``buffer_chunks`` at a time, shuffles the rows of that window
   (seeded by ``seed``, ``epoch``, shard) and cuts them into batches; a partial batch
   carries over into the next window.

So every row is seen exactly once per epoch across all ranks and workers, the order is
a pure function of (seed, epoch, ranks, workers, batch size, buffer), and memory holds at
most two windows of chunks. Batches carry (shard, position), so a consumer can record how
far each shard got (:meth:`StudentLoader.state_dict`) and resume mid-epoch: each shard
skips the batches it had delivered, without reading them.

The store and the transfer set are opened lazily inside each worker process (never
shared across a fork). zarr-python ≥ 3.0.7 also resets its I/O thread after a fork.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from darkstore.data import TransferSet
from darkstore.transfer import open_transfer_set
from storage import StoreReader, bytes_per_row, open_store
from storage.fields import target_fields


@dataclass
class Batch:
    x: torch.Tensor | None  # [B, ...] float32 inputs (None until ``to`` makes deferred views)
    logits: torch.Tensor | None  # [B, C] stored teacher logits, in the store's dtype (None: sparse targets)
    labels: torch.Tensor  # [B] int64, −1 unlabeled
    rows: torch.Tensor  # [B] int64 store rows
    members: torch.Tensor | None = None  # [B, M, C], store dtype
    shard: int = 0
    seq: int = 0  # position of this batch in its shard's epoch
    mix_labels: torch.Tensor | None = None  # [B] int64: a mixed view's partner label (−1: not mixed)
    mix_lam: torch.Tensor | None = None  # [B] float32: the weight of the row's own sample (1: not mixed)
    sparse: dict[str, torch.Tensor] | None = None  # a sparse store's target fields, [B, k] / [B] each
    features: dict[str, torch.Tensor] | None = None  # kept teacher layers by "teacher:layer", [B, *shape], store dtype
    # views replayed on the training device: the recipe and what the batch's views are made from (x is None)
    deferred: tuple[Any, Any] | None = None  # (AugmentSpec, ViewInputs)

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored target fields by name ([B, ...] each; [B, L, ...] in a language model's batch): dense
        ``logits`` (with ``members`` where they were read) or a sparse form's fields, as the store keeps them."""
        if self.logits is not None:
            return {"logits": self.logits, **({"members": self.members} if self.members is not None else {})}
        return dict(self.sparse or {})

    def _map(self, f, deferred: tuple[Any, Any] | None = None) -> "Batch":
        return Batch(f(self.x), f(self.logits), f(self.labels), self.rows, f(self.members), self.shard, self.seq,
                     f(self.mix_labels), f(self.mix_lam),
                     {k: f(v) for k, v in self.sparse.items()} if self.sparse is not None else None,
                     {k: f(v) for k, v in self.features.items()} if self.features is not None else None, deferred)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        d = self.deferred
        return self._map(lambda t: t.pin_memory() if t is not None else None,
                         (d[0], d[1].pin_memory()) if d is not None else None)

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "Batch":
        """The batch on ``device``; deferred views are made there (each sample moved once, the recipe's
        kernels run on the device), so a GPU run does not wait for its loader to rebuild views."""
        out = self._map(lambda t: t.to(device, non_blocking=non_blocking) if t is not None else None)
        if self.deferred is not None:
            recipe, inputs = self.deferred
            out.x = recipe.make(inputs.to(device, non_blocking=non_blocking))
        return out

    def __len__(self) -> int:
        return len(self.rows)


def shard_plan(rows_by_chunk: Sequence[np.ndarray], *, epoch: int, shard: int, num_shards: int, seed: int,
               shuffle: bool, buffer_chunks: int, batch_size: int, drop_last: bool = False) -> list[np.ndarray]:
    """The store rows of each batch one shard yields in one epoch (no data is read)."""
    n = len(rows_by_chunk)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    mine = order[shard::num_shards]
    rng = np.random.default_rng([seed, epoch, shard, 7])
    batches: list[np.ndarray] = []
    carry = np.empty(0, dtype=np.int64)
    for w in range(0, len(mine), buffer_chunks):
        new = np.concatenate([rows_by_chunk[c] for c in mine[w:w + buffer_chunks]] or [carry[:0]])
        if shuffle:
            new = rng.permutation(new)
        pool = np.concatenate([carry, new])
        full = len(pool) // batch_size * batch_size
        batches += [pool[s:s + batch_size] for s in range(0, full, batch_size)]
        carry = pool[full:]
    if len(carry) and not drop_last:
        batches.append(carry)
    return batches


def window_chunks(meta, buffer_mb: float, members: bool = False, features: bool = False) -> int:
    """Chunks in one shuffle window: as many as ``buffer_mb`` MiB of targets hold (at least one). A
    window in bytes, not chunks, so small stores shuffle whole and large ones stay within memory."""
    row = bytes_per_row(meta)
    if not members and meta.keep_members:  # members are read only when re-temperature needs them
        row -= meta.item_bytes * meta.num_classes * meta.num_members
    if not features:  # teacher features are read only by objectives that use them
        row -= meta.item_bytes * meta.feature_size
    return max(1, int(buffer_mb * (1 << 20) // max(1, row * meta.chunk_rows)))


def batch_mixing(stream: "StoreStream", labels: np.ndarray, epoch: int = 1) -> dict[str, float] | None:
    """How well one epoch's batches mix the classes: the mean number of distinct labels in a full batch,
    against its expectation under a full shuffle of the same rows. None without labels."""
    rows = np.concatenate(stream.rows_by_chunk_in(epoch) or [np.zeros(0, np.int64)])
    y = labels[rows]
    y = y[y >= 0]
    if len(y) == 0:
        return None
    plan = shard_plan(stream.rows_by_chunk_in(epoch), epoch=epoch, shard=0, num_shards=stream.world_size *
                      stream.num_workers, seed=stream.seed, shuffle=stream.shuffle, buffer_chunks=stream.buffer_chunks,
                      batch_size=stream.batch_size, drop_last=True)
    got = [len(np.unique(yb[yb >= 0])) for yb in (labels[b] for b in plan)]
    if not got:
        return None
    p = np.bincount(y) / len(y)
    b = stream.batch_size * len(y) / len(rows)  # labeled rows in a batch
    expected = float(np.sum(1 - (1 - p[p > 0]) ** b))
    return {"labels_per_batch": float(np.mean(got)), "full_shuffle": expected,
            "ratio": float(np.mean(got) / expected), "window_chunks": stream.buffer_chunks}


#: chunks read in one call into zarr: enough to spread its per-call cost, few enough that the decoded chunks in
#: flight stay a few MB beside the live ones
READ_GROUP = 32


class StoreStream(torch.utils.data.IterableDataset):
    """One epoch of batches for one rank; DataLoader workers split it by shard."""

    def __init__(self, store: str | Path, data_spec: Any, rows: np.ndarray, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, buffer_chunks: int = 4, rank: int = 0, world_size: int = 1,
                 members: bool = False, drop_last: bool = False, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None, data: TransferSet | None = None,
                 readahead: bool = True, views_per_epoch: int | None = None, view_targets: str = "matched",
                 features: bool = False, replay_device: str | None = None):
        super().__init__()
        self.store, self.data_spec, self.members = str(store), data_spec, members
        self.batch_size, self.seed, self.shuffle, self.buffer_chunks = batch_size, seed, shuffle, max(1, buffer_chunks)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.allow_code, self.roots = allow_code, roots
        self._data = data  # in-process use (num_workers=0) may pass an open set
        self._opened: tuple | None = None
        self._kept: tuple[int, _Live] | None = None  # (pid, chunks kept across epochs)
        self.readahead_chunks = 2 * self.buffer_chunks
        self.readahead = readahead
        opened = open_store(store, allow_incomplete=True)
        meta = opened.meta
        self.chunk_rows, self.num_rows, self.n_chunks = meta.chunk_rows, meta.num_rows, meta.n_chunks
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        # a views store: row = (sample, view); rebuild each view from its recorded parameters (refused
        # here, in the main process, when the installed code cannot do it exactly)
        self.layout = meta.layout  # row -> (sample position, view)
        self.fields = list(target_fields(meta)) + (["members"] if members else []) + (["features"] if features else [])
        # what streams with the targets, a window of chunks at a time: a views store's parameters too (8·P bytes a
        # row, about 1 GB for ImageNet with 8 views: never read whole into every loader process)
        self.stream_fields = self.fields + (["view_params"] if meta.views else [])
        # rows whose inputs and labels are in the store (token sequences: storage.kinds), not in a transfer set
        self.kind = meta.kind
        self.own_inputs = bool(meta.kind.input_fields)
        if self.own_inputs:
            self.stream_fields += list(meta.kind.input_fields)
            self.labels = self.index = None
        else:
            # labels and sample indices (16 bytes a row) are read whole, once, here: forked loader workers share
            # these pages instead of each reading its own copy (streaming them costs two zarr calls a window)
            self.labels, self.index = opened.read_field("labels"), opened.read_field("index")
        self.feature_slices = meta.feature_slices()
        self.views = meta.views_per_sample
        self.recipe = None
        self.replay_device: str | None = None  # views made in Batch.to on this device, not in the loader
        if meta.views:
            from darkstore.views import recipe_for_replay

            defer = replay_device is not None and meta.views.version >= 2  # version 1 replays on the CPU
            self.replay_device = replay_device if defer else None
            self.recipe = recipe_for_replay(meta.views, device=self.replay_device or "cpu")
        self.sample_labels = None  # a mixed view's second label: its partner sample's (mix recipes only)
        if self.recipe is not None and self.recipe.partner_column() is not None:
            self.sample_labels = _labels_by_sample(self.labels, self.index, meta.transfer_set.num_samples)
        self.views_per_epoch = views_per_epoch if self.views > 1 else None
        if view_targets not in ("matched", "clean"):
            raise ValueError(f"view_targets must be 'matched' or 'clean', not {view_targets!r}")
        if view_targets == "clean" and not (meta.views and meta.views.clean_view0):
            raise ValueError("view_targets='clean' needs a views store whose view 0 is the clean input")
        self.clean_targets = view_targets == "clean" and self.views > 1
        self._epoch_rows: tuple[int, list[np.ndarray]] | None = None
        self.rows_by_chunk = self._split(self.rows)
        # every chunk these rows touch fits in one shuffle window: a process reads each once and keeps it for
        # the next epochs (an epoch holds them all at once anyway), instead of reading the store every epoch
        self.keep_chunks = self.buffer_chunks >= sum(len(r) > 0 for r in self.rows_by_chunk)
        self.num_workers = 1  # set by StudentLoader
        self._box = None  # shared with persistent workers: [epoch, batches to skip per local shard]
        self._epoch, self._skip = 0, {}

    def share(self) -> None:
        """Keep epoch and skip counts in shared memory, so persistent workers see each new epoch."""
        import multiprocessing

        self._box = multiprocessing.Array("q", 1 + self.num_workers, lock=False)
        self._box[0] = self._epoch

    @property
    def epoch(self) -> int:
        return int(self._box[0]) if self._box is not None else self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value
        if self._box is not None:
            self._box[0] = value

    @property
    def skip(self) -> dict[int, int]:
        if self._box is None:
            return self._skip
        first = self.rank * self.num_workers
        return {first + w: int(self._box[1 + w]) for w in range(self.num_workers) if self._box[1 + w]}

    @skip.setter
    def skip(self, value: dict[int, int]) -> None:
        self._skip = dict(value)
        if self._box is not None:
            first = self.rank * self.num_workers
            for w in range(self.num_workers):
                self._box[1 + w] = int(value.get(first + w, 0))

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker opens its own store and data
        return {**self.__dict__, "_opened": None, "_kept": None}

    def _split(self, rows: np.ndarray) -> list[np.ndarray]:
        cut = np.searchsorted(rows, np.arange(0, self.num_rows + self.chunk_rows, self.chunk_rows))
        return [rows[a:b] for a, b in zip(cut[:-1], cut[1:])][: self.n_chunks]

    def rows_by_chunk_in(self, epoch: int) -> list[np.ndarray]:
        """The rows of one epoch, by chunk: all of them, or ``views_per_epoch`` seeded random views of
        each sample (a pure function of seed and epoch, so a resumed epoch draws the same views)."""
        if self.views_per_epoch is None:
            return self.rows_by_chunk
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            from darkstore.views import select_views

            self._epoch_rows = (epoch, self._split(select_views(self.rows, self.layout, self.views_per_epoch,
                                                                self.seed, epoch)))
        return self._epoch_rows[1]

    def shards(self) -> list[int]:
        return [self.rank * self.num_workers + w for w in range(self.num_workers)]

    def plan(self, shard: int) -> list[np.ndarray]:
        return shard_plan(self.rows_by_chunk_in(self.epoch), epoch=self.epoch, shard=shard,
                          num_shards=self.world_size * self.num_workers, seed=self.seed, shuffle=self.shuffle,
                          buffer_chunks=self.buffer_chunks, batch_size=self.batch_size, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        shard = self.rank * self.num_workers + worker
        batches = self.plan(shard)
        skip = self.skip.get(shard, 0)
        if skip >= len(batches):
            return
        reader, data = self._open(info is None)
        live = self._kept_chunks() if self.keep_chunks else _Live(self.chunk_rows)
        # when each chunk is first and last needed: read ahead in a thread, keep only live chunks
        chunks_of = _chunks_of_batches(batches[skip:], self.chunk_rows)
        first_at: dict[int, int] = {}
        last_use: dict[int, int] = {}
        for i, cs in enumerate(chunks_of, start=skip):
            for c in cs:
                first_at.setdefault(c, i)
                last_use[c] = i
        first_use = [c for c in first_at if c not in live]  # in the order batches first need them
        live.reserve(len(last_use) if self.keep_chunks else _most_at_once(first_at, last_use))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="darkstore-readahead") if self.readahead \
            else _Inline()
        pending: dict[int, Future] = {}
        nxt = 0
        try:
            for i in range(skip, len(batches)):
                rows = batches[i]
                chunk_ids = rows // self.chunk_rows
                need = [c for c in chunks_of[i - skip] if c not in live]
                # read ahead up to a bound, and always far enough for this batch (sparse rows, e.g. a
                # holdout, can spread one batch over more chunks than the read-ahead bound)
                while nxt < len(first_use) and (len(pending) < self.readahead_chunks
                                                or any(c not in pending for c in need)):
                    group = first_use[nxt:nxt + min(self.buffer_chunks, READ_GROUP)]  # one zarr call reads them
                    fut = pool.submit(self._read, reader, group)
                    for c in group:
                        pending[c] = fut
                    nxt += len(group)
                for c in need:
                    live.add(c, pending.pop(c).result()[c])
                yield self._batch(rows, chunk_ids, live, data, shard, i)
                if not self.keep_chunks:
                    for c in [c for c in live.chunks if last_use[c] <= i]:
                        live.drop(c)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _kept_chunks(self) -> "_Live":
        """This process's chunks kept across epochs (a forked worker starts its own)."""
        if self._kept is None or self._kept[0] != os.getpid():
            self._kept = (os.getpid(), _Live(self.chunk_rows))
        return self._kept[1]

    def _open(self, in_process: bool) -> tuple[StoreReader, TransferSet]:
        """The store and the transfer set, opened once per process (inside each DataLoader worker)."""
        pid = os.getpid()
        if self._opened is None or self._opened[0] != pid:
            reader = open_store(self.store, allow_incomplete=True)
            if self.own_inputs:
                self._opened = (pid, reader, None)
                return reader, None
            # an open set given by the caller is inherited by forked workers (copy-on-write) rather
            # than reopened: reopening an in-memory .npz in every worker at every epoch is slow
            data = self._data if self._data is not None else open_transfer_set(
                self.data_spec, allow_code=self.allow_code, roots=self.roots)
            self._opened = (pid, reader, data)
        return self._opened[1], self._opened[2]

    def _read(self, reader: StoreReader, group: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Read several chunks' targets through the reader, one mapping per chunk: zarr fetches and decodes
        them concurrently in one call (its overhead, about a millisecond, paid once per group), and every
        chunk is checked against its checksum and for non-finite targets."""
        return dict(zip(group, reader.read_chunk_parts(group, self.stream_fields)))

    def _batch(self, rows: np.ndarray, chunk_ids: np.ndarray, live: "_Live", data: TransferSet, shard: int,
               seq: int) -> Batch:
        if self.own_inputs:
            return stored_inputs_batch(self.kind, live.gather(rows, chunk_ids), rows, shard, seq)
        reader, labels, index = self._opened[1], self.labels, self.index  # labels, index: read once (__init__)
        t = live.gather(rows, chunk_ids)
        params = t.pop("view_params", None)
        if self.clean_targets:  # the stale-target ablation: every view gets its sample's clean-view targets
            clean, back = np.unique(self.layout.first_row(rows), return_inverse=True)
            t = {k: (v[:, back] if k == "members" else v[back]) for k, v in reader.read(clean, self.fields).items()}
        logits, members, feats = t.pop("logits", None), t.pop("members", None), t.pop("features", None)
        mix_labels = mix_lam = deferred = None
        if self.recipe is not None:  # replay: the original inputs through the recorded parameters
            inputs = self.recipe.inputs(data, index[rows], params)
            if self.replay_device is None:
                x = self.recipe.make(inputs)
            else:
                x, deferred = None, (self.recipe, inputs)
            col = self.recipe.partner_column()
            if col is not None:
                partner = params[:, col].astype(np.int64)
                mixed = partner >= 0
                mix_labels = np.where(mixed, self.sample_labels[np.where(mixed, partner, 0)], -1)  # partner: a sample
                mix_lam = np.where(mixed, params[:, col + 1], 1.0).astype(np.float32)
                mix_labels, mix_lam = torch.from_numpy(mix_labels), torch.from_numpy(mix_lam)
        else:
            x, _ = data.get_batch(index[rows])
        mem = torch.from_numpy(np.ascontiguousarray(members.transpose(1, 0, 2))) if members is not None else None
        return Batch(x, torch.from_numpy(logits) if logits is not None else None, torch.from_numpy(labels[rows]),
                     torch.from_numpy(rows.copy()), mem, shard, seq, mix_labels, mix_lam,
                     {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()} or None,
                     self._split_features(feats), deferred)

    def _split_features(self, feats: np.ndarray | None) -> dict[str, torch.Tensor] | None:
        if feats is None:
            return None
        return {name: torch.from_numpy(np.ascontiguousarray(feats[:, cols]).reshape(len(feats), *shape))
                for name, (cols, shape) in self.feature_slices.items()}


def stored_inputs_batch(kind: Any, t: dict[str, np.ndarray], rows: np.ndarray, shard: int, seq: int) -> Batch:
    """A batch of rows whose inputs are in the store (the kind's ``inputs``: token rows give ``x`` [B, L] and
    ``labels`` [B, L], the next tokens, −1 where no loss); the targets as stored ([B, L, ...])."""
    x, labels = kind.inputs(t)
    logits = t.pop("logits", None)
    return Batch(torch.from_numpy(x),
                 torch.from_numpy(logits) if logits is not None else None, torch.from_numpy(labels),
                 torch.from_numpy(rows.copy()), None, shard, seq,
                 sparse={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()} or None)


def _most_at_once(first_at: dict[int, int], last_use: dict[int, int]) -> int:
    """The most chunks held at once when each is held from the batch that first needs it to its last."""
    if not first_at:
        return 0
    events = sorted([(first_at[c], 1) for c in first_at] + [(last_use[c] + 1, -1) for c in first_at])
    return int(np.cumsum([d for _, d in events]).max())


def _chunks_of_batches(batches: list[np.ndarray], chunk_rows: int) -> list[list[int]]:
    """Each batch's chunks, ascending: one sort over the epoch rather than a unique per batch."""
    if not batches:
        return []
    which = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
    pairs = np.unique(which * (np.int64(1) << 40) + np.concatenate(batches) // chunk_rows)
    batch_of, chunk = pairs >> 40, pairs & ((np.int64(1) << 40) - 1)
    cuts = np.searchsorted(batch_of, np.arange(1, len(batches)))
    return [c.tolist() for c in np.split(chunk, cuts)]


class _Inline:
    """A stand-in executor that reads when asked (no read-ahead thread)."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, **_: Any) -> None:
        pass


class _Live:
    """The chunks in memory: one array per target field with a slot of ``chunk_rows`` rows per chunk, so that
    a batch's targets are one fancy index each and adding a chunk is one copy into a free slot (``members``
    has its rows on axis 1). ``reserve`` sizes it for the most chunks an epoch holds at once."""

    def __init__(self, chunk_rows: int):
        self.chunk_rows = chunk_rows
        self.slot: dict[int, int] = {}  # chunk -> its slot
        self.free: list[int] = []
        self.capacity = 0
        self.want = 1
        self.bufs: dict[str, np.ndarray] = {}
        self.slot_of = np.zeros(0, dtype=np.int64)  # chunk -> slot, for the vectorised gather

    @property
    def chunks(self) -> list[int]:
        return list(self.slot)

    def __contains__(self, c: int) -> bool:
        return c in self.slot

    def reserve(self, slots: int) -> None:
        self.want = max(self.want, slots)

    def add(self, c: int, chunk: dict[str, np.ndarray]) -> None:
        if not self.free:
            self._grow(chunk, max(self.want, self.capacity + 1))
        s, r = self.free.pop(), self.chunk_rows
        for n, v in chunk.items():
            if n == "members":
                self.bufs[n][:, s * r:s * r + v.shape[1]] = v
            else:
                self.bufs[n][s * r:s * r + len(v)] = v
        self.slot[c] = s
        if c >= len(self.slot_of):
            self.slot_of = np.concatenate([self.slot_of, np.zeros(c + 1 - len(self.slot_of), dtype=np.int64)])
        self.slot_of[c] = s

    def drop(self, c: int) -> None:
        self.free.append(self.slot.pop(c))

    def gather(self, rows: np.ndarray, chunk_ids: np.ndarray) -> dict[str, np.ndarray]:
        pos = (self.slot_of[chunk_ids] - chunk_ids) * self.chunk_rows + rows
        return {n: (b[:, pos] if n == "members" else b[pos]) for n, b in self.bufs.items()}

    def _grow(self, chunk: dict[str, np.ndarray], slots: int) -> None:
        """Room for ``slots`` chunks; what is held moves over (untouched pages of ``np.empty`` cost no memory)."""
        r = self.chunk_rows
        for n, v in chunk.items():
            axis = 1 if n == "members" else 0
            shape = list(v.shape)
            shape[axis] = slots * r
            new = np.empty(shape, dtype=v.dtype)
            old = self.bufs.get(n)
            if old is not None:
                (new[:, :old.shape[1]] if axis else new[:old.shape[0]])[...] = old
            self.bufs[n] = new
        self.free.extend(range(slots - 1, self.capacity - 1, -1))  # popped from the end: lowest slot first
        self.capacity = slots


@dataclass
class StudentLoader:
    """Epochs of :class:`Batch` from a store, with state for mid-epoch resume.

    ``state_dict()`` after any batch, ``load_state_dict()`` on a fresh loader, then
    ``epoch(e)`` yields exactly the batches the interrupted epoch had not delivered."""

    stream: StoreStream
    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int = 2
    multiprocessing_context: str | None = None
    _seen: dict[int, int] = field(default_factory=dict)
    _epoch: int = 0
    _dl: Any = None

    def __post_init__(self) -> None:
        self.stream.num_workers = max(1, self.num_workers)
        if self.num_workers > 0:
            self.stream.share()

    def batches_in_epoch(self, epoch: int) -> int:
        return sum(len(shard_plan(self.stream.rows_by_chunk_in(epoch), epoch=epoch, shard=s,
                                  num_shards=self.stream.world_size * self.stream.num_workers,
                                  seed=self.stream.seed, shuffle=self.stream.shuffle,
                                  buffer_chunks=self.stream.buffer_chunks, batch_size=self.stream.batch_size,
                                  drop_last=self.stream.drop_last))
                   for s in self.stream.shards())

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if epoch != self._epoch:
            self._seen = {}
        self._epoch = epoch
        self.stream.epoch, self.stream.skip = epoch, dict(self._seen)
        if self.num_workers == 0 and not self.pin_memory:  # in this process: no DataLoader round trip a batch
            for b in self.stream:
                self._seen[b.shard] = b.seq + 1
                yield b
            return
        if self._dl is None:
            kw: dict[str, Any] = {}
            if self.num_workers > 0:  # workers live across epochs: no fork, no reopening per epoch
                kw = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.multiprocessing_context,
                      "persistent_workers": True}
            # its own generator: starting an epoch must not draw from the global RNG, or a resumed run
            # (RNG state restored mid-epoch) would diverge from an uninterrupted one
            self._dl = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                                   pin_memory=self.pin_memory, generator=torch.Generator(), **kw)
        for b in self._dl:
            self._seen[b.shard] = b.seq + 1
            yield b

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "seen": {str(k): v for k, v in self._seen.items()},
                "seed": self.stream.seed, "num_shards": self.stream.world_size * self.stream.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shards = self.stream.world_size * self.stream.num_workers
        if state.get("num_shards", shards) != shards or state.get("seed", self.stream.seed) != self.stream.seed:
            raise ValueError(
                f"loader state was saved with {state.get('num_shards')} shards and seed {state.get('seed')}; "
                f"this loader has {shards} shards and seed {self.stream.seed}: resume with the same ranks, workers "
                "and seed"
            )
        self._epoch = int(state["epoch"])
        self._seen = {int(k): int(v) for k, v in state["seen"].items()}


def _labels_by_sample(labels: np.ndarray, index: np.ndarray, num_samples: int) -> np.ndarray:
    """Each transfer-set sample's hard label (−1: unlabeled, or none of its rows committed yet)."""
    out = np.full(num_samples, -1, dtype=np.int64)
    ok = index >= 0
    out[index[ok]] = labels[ok]
    return out


def make_loader(reader: StoreReader | str | Path, rows: np.ndarray, *, batch_size: int, seed: int = 0,
                shuffle: bool = True, num_workers: int = 0, buffer_chunks: int = 4, rank: int = 0,
                world_size: int = 1, members: bool = False, data_spec: Any = None, data: TransferSet | None = None,
                pin_memory: bool = False, allow_code: bool = False, roots: Sequence[str | Path] | None = None,
                drop_last: bool = False, readahead: bool = True, views_per_epoch: int | None = None,
                view_targets: str = "matched", features: bool = False,
                replay_device: str | None = None) -> StudentLoader:
    """A loader over ``rows`` of a store. ``readahead`` reads the next windows' chunks in a thread
    (what a GPU run wants: the CPU is idle); on a CPU-bound run it neither helps nor hurts much.
    ``replay_device``: a views store's views (recipe version 2) are made by ``Batch.to`` on that device
    instead of in the loader (its batches carry ``x=None`` until then); replay is checked on that device."""
    path = reader.path if isinstance(reader, StoreReader) else str(reader)
    if data_spec is None:
        data_spec = data.spec if data is not None else open_store(path, allow_incomplete=True).meta.transfer_set.spec
    stream = StoreStream(path, data_spec, rows, batch_size=batch_size, seed=seed, shuffle=shuffle,
                         buffer_chunks=buffer_chunks, rank=rank, world_size=world_size, members=members,
                         drop_last=drop_last, allow_code=allow_code, roots=roots, data=data, readahead=readahead,
                         views_per_epoch=views_per_epoch, view_targets=view_targets, features=features,
                         replay_device=replay_device)
    return StudentLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


__all__ = ["Batch", "StoreStream", "StudentLoader", "batch_mixing", "make_loader", "shard_plan", "window_chunks"]
