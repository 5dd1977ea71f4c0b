"""trainjob.data.stream: each worker's order is a function of the seed and the epoch, the
workers' shards are disjoint, a stream started at sample k is the uninterrupted stream from
k on, and local disk never holds more than the buffer; a damaged shard is fetched again
once, then named (exit 4)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import tensorflow as tf

from trainjob.data import stream
from trainjob.data.stream import WINDOW, Plan, records
from trainjob.errors import ConfigError, StorageError
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store


@dataclass(frozen=True)
class Shard:
    name: str
    count: int
    sha256: str


def write_shards(store, folder: Path, counts: list[int]) -> list[Shard]:
    """TFRecord shards whose records are their samples' ids (b"00017"), stored in ``store``."""
    shards, first = [], 0
    folder.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(counts):
        path = folder / f"train-{k:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as w:
            for i in range(first, first + n):
                w.write(f"{i:05d}".encode() * (1 + i % 3))  # records of several lengths
        name = f"shards/{path.name}"
        store.put(path, name)
        shards.append(Shard(name, n, hashlib.sha256(path.read_bytes()).hexdigest()))
        first += n
    return shards


def ids(chunks) -> list[int]:
    return [int(rec[:5]) for chunk in chunks for rec in chunk]


COUNTS = [7, 6, 7, 6, 7, 7, 6, 7, 6, 7, 7]  # 73 samples in 11 shards (counts +-1)


def test_each_epoch_is_a_partition_that_depends_on_the_seed_and_the_epoch_alone():
    shards = [Shard(f"s{k}", n, "") for k, n in enumerate(COUNTS)]
    for workers in (1, 2, 3):
        for epoch in (0, 1):
            plans = [Plan(shards, seed=5, workers=workers, worker=w) for w in range(workers)]
            taken = [p.worker_shards(epoch) for p in plans]
            assert sorted(i for t in taken for i in t) == list(range(len(shards)))  # disjoint
            pairs = [pair for p in plans for pair in p.order(epoch, 10**6)[:sum(
                shards[i].count for i in p.worker_shards(epoch))]]
            assert sorted(pairs) == sorted((k, r) for k, n in enumerate(COUNTS)
                                           for r in range(n))  # every sample once
            # A fresh Plan (a new process) gives the same order; another seed or epoch not.
            again = Plan(list(shards), seed=5, workers=workers, worker=0)
            assert again.order(epoch, 40) == plans[0].order(epoch, 40)
    one = Plan(shards, seed=5)
    assert one.order(0, 73) != one.order(1, 73)
    assert one.order(0, 73) != Plan(shards, seed=6).order(0, 73)
    # The shuffle window mixes shards: the first WINDOW x 7 samples come from WINDOW shards.
    first = one.order(0, 20)
    assert 1 < len({k for k, _ in first}) <= WINDOW


def test_a_worker_trains_full_batches_only_and_fewer_shards_than_workers_is_refused():
    shards = [Shard(f"s{k}", n, "") for k, n in enumerate(COUNTS)]
    assert Plan(shards, seed=0).per_worker(8) == 73  # one worker: all (last batch partial)
    two = Plan(shards, seed=0, workers=2)
    # 5 shards of at least 6 for each: 30, as full batches of 8: 24, every epoch.
    assert two.per_worker(8) == 24
    with pytest.raises(ConfigError, match="fewer than its batch"):
        two.per_worker(32)
    with pytest.raises(ConfigError, match="cannot feed 12 workers"):
        Plan(shards, seed=0, workers=12)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stream_started_at_sample_k_is_the_uninterrupted_stream_from_k_on(
        store, tmp_path, workers):
    shards = write_shards(store, tmp_path / "made", COUNTS)
    for worker in range(workers):
        plan = Plan(shards, seed=3, workers=workers, worker=worker)
        count = plan.per_worker(4)
        full = ids(records(plan, store, 2, count, 0, tmp_path / "buf", WINDOW + 1))
        expected = [shards_first(shards)[k] + r for k, r in plan.order(2, count)]
        assert full == expected and len(full) == count
        for start in random.Random(worker).sample(range(1, count), 5) + [count - 1]:
            tail = ids(records(plan, store, 2, count, start, tmp_path / "buf", WINDOW + 1))
            assert tail == full[start:], start


def shards_first(shards: list[Shard]) -> list[int]:
    out, first = [], 0
    for s in shards:
        out.append(first)
        first += s.count
    return out


def test_a_share_shorter_than_the_epoch_goes_round_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    shards = write_shards(store, tmp_path / "made", [5, 5, 5])
    plan = Plan(shards, seed=1)
    got = ids(records(plan, store, 0, 40, 0, tmp_path / "buf", WINDOW + 1))
    assert got == (got[:15] * 3)[:40] and sorted(got[:15]) == list(range(15))
    assert ids(records(plan, store, 0, 40, 33, tmp_path / "buf", WINDOW + 1)) == got[33:]


def test_local_disk_never_holds_more_than_the_buffer_and_nothing_before_the_start(tmp_path):
    store = LocalStore(tmp_path / "store")
    shards = write_shards(store, tmp_path / "made", [4] * 16)
    plan = Plan(shards, seed=2)
    buf = tmp_path / "buf"
    on_disk = []
    fetched = []
    get = store.get
    store.get = lambda key, dest: (fetched.append(key), get(key, dest))[1]
    got = ids(records(plan, store, 0, 64, 0, buf, WINDOW + 1,
                      on_sample=lambda *_: on_disk.append(len(list(buf.iterdir())))))
    assert len(got) == 64 and max(on_disk) <= WINDOW + 1
    assert max(on_disk) > WINDOW  # the prefetcher did fetch ahead, up to the bound
    assert not list(buf.iterdir())  # consumed shards are deleted
    # Started in the third window: the shards of the first two are never fetched.
    fetched.clear()
    ids(records(plan, store, 0, 64, 2 * WINDOW * 4 + 1, buf, WINDOW + 1))
    windows = plan.windows(0)
    skipped = {shards[i].name for ids_, _ in windows[:2] for i in ids_}
    assert fetched and not skipped & set(fetched)


def test_a_damaged_shard_is_fetched_again_once_then_named(through_proxy, bucket, tmp_path,
                                                          caplog):
    proxy = through_proxy()
    store = S3Store(bucket, "packed", threads=2)
    shards = write_shards(store, tmp_path / "made", [6] * 5)
    plan = Plan(shards, seed=0)
    expected = ids(records(plan, store, 0, 30, 0, tmp_path / "buf", WINDOW + 1))
    victim = shards[plan.worker_shards(0)[0]].name
    proxy.corrupt(victim, times=1)  # served damaged once: the second fetch is good
    assert ids(records(plan, store, 0, 30, 0, tmp_path / "buf", WINDOW + 1)) == expected
    assert proxy.injected["corrupt"] == 1
    assert f"{victim}: sha256" in caplog.text and "fetching it again" in caplog.text
    proxy.corrupt(victim, times=2)  # damaged every time: exit 4, naming the shard
    with pytest.raises(StorageError, match=f"{victim}: sha256 .* twice") as err:
        ids(records(plan, store, 0, 30, 0, tmp_path / "buf", WINDOW + 1))
    assert err.value.exit_code == 4


def test_a_shard_cut_in_a_record_is_refused(tmp_path):
    data = b"\x05\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 4 + b"abc"
    with pytest.raises(StorageError, match="middle of a record"):
        stream.record_offsets(data)
