"""Streaming a packed dataset (``data.packed``): each worker reads only its own shards,
through a bounded local buffer, in an order that is a function of the seed and the epoch
alone, and a resumed run continues with the next sample. No TensorFlow here: the training
layer feeds the records this module yields to tf.data.

The order of a split's epoch, for worker ``w`` of ``W`` (``Plan``):

1. the split's shards are permuted by (seed, epoch);
2. worker w takes the contiguous block ``perm[w*K//W : (w+1)*K//W]``: disjoint shards;
3. its shards are cut into windows of WINDOW shards, and the samples of each window are
   permuted by (seed, epoch, the window's first shard): the shuffle window;
4. it trains ``count`` samples of that order: all of them on one worker (the last batch
   partial, as the classic path does), or as many full per-worker batches as the smallest
   possible share holds on several, the same every epoch (``per_worker``), so that every
   step is a full global batch.

A save point records the step; the stream of the epoch it stopped in starts at sample
``step x worker batch``: at the window that holds it, nothing before it read or decoded.

The ``Prefetcher`` downloads the shards a worker needs, in the order it needs them, into a
buffer of at most ``buffer`` shards on disk (at least WINDOW + 1), checks each against the
index's sha256 (fetched again once, then StorageError naming it: exit 4), and deletes a
window's shards once they are consumed.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from trainjob.errors import ConfigError, StorageError
from trainjob.store.base import Store

log = logging.getLogger(__name__)

WINDOW = 4  # shards whose samples are shuffled together
EVAL_SLOTS = 2  # of the buffer, the shards a validation or test stream holds at once
# The training stream holds a window and fetches the next shard meanwhile; a validation or
# the test stream may run beside it (tf.data prefetches the next epoch during validation).
MIN_BUFFER = WINDOW + 1 + EVAL_SLOTS
CHUNK = 64  # serialized records per item handed to tf.data
HEADER, FOOTER = 12, 4  # a TFRecord record: length (8) and its crc (4), data, data's crc (4)


class ShardLike(Protocol):
    name: str
    count: int
    sha256: str


@dataclass(frozen=True)
class Packed:
    """A packed dataset being read: the store its shards are in and its index
    (``data.packed``)."""

    store: Store
    index: object  # data.packed.PackedIndex

    def shards(self, split: str) -> list:
        return self.index.split_shards(split)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_buffer(setting: str) -> tuple[int, str]:
    """``--stream-buffer``: (n, "shards") for a bare number, (bytes, "bytes") for a size
    (500MB, 2GiB); ConfigError otherwise."""
    text = str(setting).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if value <= 0 or unit not in _UNITS or (not unit and not value.is_integer()):
        raise ConfigError(f"--stream-buffer {setting!r}: give a number of shards (10) or a "
                          "size (2GB, 1.5GiB)")
    return (int(value), "shards") if not unit else (int(value * _UNITS[unit]), "bytes")


def buffer_shards(setting: str, shards: Sequence) -> int:
    """How many shards the buffer ``setting`` holds (a size: counted by the largest
    shard); ConfigError when fewer than MIN_BUFFER."""
    value, unit = parse_buffer(setting)
    largest = max((s.bytes for s in shards), default=1)
    n = value if unit == "shards" else value // largest
    if n < MIN_BUFFER:
        held = f"{n} shards" if unit == "shards" else \
            f"{n} shards of up to {largest / 1e6:.0f} MB"
        raise ConfigError(f"--stream-buffer {setting}: holds {held}; a packed dataset needs "
                          f"at least {MIN_BUFFER} ({MIN_BUFFER * largest / 1e6:.0f} MB): give "
                          "a larger buffer, or pack with smaller shards")
    return n


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


@dataclass(frozen=True)
class Plan:
    """Which samples a worker takes in an epoch, in which order: a pure function of the
    split's shards, the seed, the epoch and the number of workers."""

    shards: Sequence[ShardLike]
    seed: int
    workers: int = 1
    worker: int = 0
    shuffle: bool = True  # False: the index's order (still split among the workers)

    def __post_init__(self) -> None:
        if len(self.shards) < self.workers:
            raise ConfigError(
                f"{len(self.shards)} shards cannot feed {self.workers} workers each its own: "
                "pack the dataset with smaller shards (dataset pack --shard-size) or train "
                "on fewer workers")

    def worker_shards(self, epoch: int) -> list[int]:
        """This worker's shards in ``epoch`` (indices into ``shards``), in reading order."""
        k = len(self.shards)
        perm = _rng(self.seed, epoch, 1).permutation(k) if self.shuffle else np.arange(k)
        return [int(i) for i in perm[self.worker * k // self.workers:
                                     (self.worker + 1) * k // self.workers]]

    def windows(self, epoch: int) -> list[tuple[list[int], np.ndarray]]:
        """(shards, order) per window: ``order`` lists (position in ``shards``, record)."""
        out = []
        mine = self.worker_shards(epoch)
        for g in range(0, len(mine), WINDOW):
            ids = mine[g:g + WINDOW]
            pairs = np.concatenate([np.stack([np.full(self.shards[i].count, j),
                                              np.arange(self.shards[i].count)], 1)
                                    for j, i in enumerate(ids)])
            if self.shuffle:
                pairs = pairs[_rng(self.seed, epoch, 2, ids[0]).permutation(len(pairs))]
            out.append((ids, pairs))
        return out

    def per_worker(self, worker_batch: int) -> int:
        """Samples each worker trains per epoch: all on one worker; on several, as many full
        batches as the smallest share any epoch can give holds (shards hold counts +-1)."""
        if self.workers == 1:
            return sum(s.count for s in self.shards)
        fewest = len(self.shards) // self.workers * min(s.count for s in self.shards)
        if fewest < worker_batch:
            raise ConfigError(f"each of {self.workers} workers gets {fewest} samples an epoch, "
                              f"fewer than its batch ({worker_batch}): use fewer workers or a "
                              "smaller --batch-size")
        return fewest // worker_batch * worker_batch

    def order(self, epoch: int, count: int) -> list[tuple[int, int]]:
        """The first ``count`` (shard, record) pairs this worker takes in ``epoch``; the
        reference the stream follows (and the tests compare with)."""
        pairs = [(ids[j], int(r)) for ids, order in self.windows(epoch) for j, r in order]
        return (pairs * (count // max(1, len(pairs)) + 1))[:count]


def records(plan: Plan, store: Store, epoch: int, count: int, start: int, buffer_dir: Path,
            buffer: int, on_sample: Callable[[int, int, bytes], None] | None = None
            ) -> Iterator[list[bytes]]:
    """The serialized records of samples ``start`` to ``count`` of the worker's ``epoch``,
    in chunks of CHUNK, streamed through a buffer of at most ``buffer`` shards; a worker
    whose share is shorter than ``count`` (steps per epoch set) goes round it again.
    ``on_sample(epoch, position, record)``: a test hook sees each in order."""
    windows = plan.windows(epoch)
    sizes = [len(order) for _, order in windows]
    total = sum(sizes)
    position = start
    while position < count:
        first, skip = _window_at(sizes, position % total)
        needed, taken = [], 0  # the windows this lap still reads: no shard before them
        for g in range(first, len(windows)):
            if taken >= count - position + skip:
                break
            needed.append(g)
            taken += sizes[g]
        fetcher = Prefetcher(store, [plan.shards[i] for g in needed for i in windows[g][0]],
                             buffer_dir, buffer).start()
        try:
            slot = 0
            for g in needed:
                ids, order = windows[g]
                # Memory-mapped, not read: RAM holds the records in flight, not the window.
                maps = [_mapped(fetcher.get(slot + j)) for j in range(len(ids))]
                try:
                    offsets = [record_offsets(m) for m in maps]
                    part = order[skip:][:count - position]
                    skip = 0
                    for c in range(0, len(part), CHUNK):
                        chunk = [maps[j][offsets[j][r][0]:offsets[j][r][0] + offsets[j][r][1]]
                                 for j, r in part[c:c + CHUNK]]
                        if on_sample:
                            for n, rec in enumerate(chunk):
                                on_sample(epoch, position + c + n, rec)
                        yield chunk
                    position += len(part)
                finally:
                    for m in maps:
                        m.close()
                for j in range(len(ids)):
                    fetcher.release(slot + j)
                slot += len(ids)
                if position >= count:
                    break
        finally:
            fetcher.close()


def sequential(store: Store, shards: Sequence[ShardLike], buffer_dir: Path, buffer: int
               ) -> Iterator[list[bytes]]:
    """Every record of ``shards``, in order, in chunks of CHUNK (validation, the test split),
    through a buffer of at most ``buffer`` shards."""
    fetcher = Prefetcher(store, shards, buffer_dir, buffer).start()
    try:
        for slot in range(len(shards)):
            m = _mapped(fetcher.get(slot))
            try:
                offsets = record_offsets(m)
                for c in range(0, len(offsets), CHUNK):
                    yield [m[a:a + n] for a, n in offsets[c:c + CHUNK]]
            finally:
                m.close()
            fetcher.release(slot)
    finally:
        fetcher.close()


def _mapped(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _window_at(sizes: list[int], position: int) -> tuple[int, int]:
    """(the window holding sample ``position``, how many of its samples come before)."""
    for g, n in enumerate(sizes):
        if position < n:
            return g, position
        position -= n
    return len(sizes), 0


def record_offsets(blob: bytes | mmap.mmap) -> list[tuple[int, int]]:
    """(data offset, length) of every record of a TFRecord file (its crcs are not checked:
    the shard's sha256 was)."""
    out, pos, end = [], 0, len(blob)
    while pos < end:
        (n,) = struct.unpack_from("<Q", blob, pos)
        out.append((pos + HEADER, n))
        pos += HEADER + n + FOOTER
    if pos != end:
        raise StorageError("a packed shard ends in the middle of a record: pack it again")
    return out


@dataclass
class Prefetcher:
    """Downloads ``shards`` in order into ``folder``, at most ``buffer`` of them on disk."""

    store: Store
    shards: Sequence[ShardLike]
    folder: Path
    buffer: int
    threads: int = 2
    _ready: dict[int, Path] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _error: BaseException | None = None
    _on_disk: int = 0
    _next: int = 0
    _stopped: bool = False

    def start(self) -> Prefetcher:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(self.threads):
            threading.Thread(target=self._run, name="trainjob-shards", daemon=True).start()
        return self

    def _take(self) -> int | None:
        with self._cond:
            while not self._stopped and self._next < len(self.shards) and \
                    self._on_disk >= self.buffer:
                self._cond.wait()
            if self._stopped or self._next >= len(self.shards):
                return None
            self._next += 1
            self._on_disk += 1
            return self._next - 1

    def _run(self) -> None:
        while (i := self._take()) is not None:
            shard = self.shards[i]
            path = self.folder / f"{os.getpid()}-{i:06d}-{Path(shard.name).name}"
            try:
                for attempt in (1, 2):
                    self.store.get(shard.name, path)
                    got = _sha256(path)
                    if got == shard.sha256:
                        break
                    log.warning("%s: sha256 %s, not the index's %s; fetching it again",
                                self.store.child(shard.name), got, shard.sha256)
                else:
                    raise StorageError(
                        f"{self.store.child(shard.name)}: sha256 {got} does not match the "
                        f"index's {shard.sha256}, twice: the packed dataset is damaged; pack "
                        "it again")
            except BaseException as exc:  # noqa: BLE001 - the reader raises it
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[i] = path
                self._cond.notify_all()

    def get(self, i: int) -> Path:
        """Shard ``i``'s local file, once downloaded and checked."""
        with self._cond:
            while i not in self._ready:
                if self._error is not None:
                    raise self._error
                self._cond.wait(timeout=1.0)
            return self._ready[i]

    def release(self, i: int) -> None:
        """Shard ``i`` is consumed: its file goes, and the next may be fetched."""
        with self._cond:
            self._ready.pop(i).unlink(missing_ok=True)
            self._on_disk -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            for path in self._ready.values():
                path.unlink(missing_ok=True)


def clear_buffer(folder: Path) -> None:
    """Remove what a killed job left in its buffer folder."""
    shutil.rmtree(folder, ignore_errors=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
