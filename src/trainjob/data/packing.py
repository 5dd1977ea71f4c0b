"""``dataset pack``'s work: a checked catalog and its split turned into shards in a store,
then the index, last.

The plan (which sample goes into which shard, in which order, with which id) is a pure
function of the catalog, the split and the shard size, so every rerun recomputes the same
one. Shards are built in processes (``shardwrite``), on every core, and uploaded by
threads as they come (multipart above the store's threshold). Beside each stored shard, a
small record ``.pack/<shard>.json`` says what it was built from (``inputs``), its sha256,
size and the ETag the store gave it. A rerun after a kill reuses a shard whose record
matches its plan, whose size and ETag are still those recorded (a local shard is hashed
again), and builds the others. Nothing is done until ``index.json`` is written.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from trainjob import hooks
from trainjob.data.catalog import Catalog, Splits, samples_digest
from trainjob.data.packed import INDEX, SPLITS, PackedIndex, Shard, SplitSettings, check_format
from trainjob.data.shardwrite import Built, PackItem, ShardPlan, build_shard, watch_parent
from trainjob.errors import ConfigError, TrainJobError
from trainjob.store.base import Store
from trainjob.store.hostcache import pid_alive
from trainjob.store.local import LocalStore

log = logging.getLogger(__name__)

MIN_TRAIN_SHARDS = 16  # several workers read disjoint shards
RECORDS = ".pack"
# Shard names, and the temporaries a local put leaves when killed
_SHARD_NAME = re.compile(r"\.?(train|val|test)-\d{5}\.tfrecord(?:\.tmp)?")


@dataclass(frozen=True)
class Progress:
    """One shard done: what the command shows."""

    shard: Shard
    reused: bool
    reencoded: int
    done: int  # shards done so far, of ``total``
    total: int
    source_done: int  # input bytes of the shards done, of ``source_total``
    source_total: int


def record_key(name: str) -> str:
    return f"{RECORDS}/{name}.json"


def sample_key(catalog: Catalog, path: str, origin: str, label: int) -> str:
    """"class/file name" of a sample's original file (its path under the class root)."""
    for candidate in (origin, path):
        try:
            return Path(candidate).relative_to(catalog.root).as_posix()
        except ValueError:
            continue
    return f"{catalog.classes[label]}/{Path(path).name}"


def plan(catalog: Catalog, splits: Splits, shard_size: int) -> list[ShardPlan]:
    """The shards of every split, in order: ids dense in (class, file path) order; each
    split cut into shards of about ``shard_size`` input bytes with equal counts (+-1), in
    the split's order (training's is seeded and mixes classes); at least MIN_TRAIN_SHARDS
    training shards where there are that many training images."""
    keyed = [(s.label, sample_key(catalog, s.path, s.origin, s.label), s) for s in catalog.samples]
    keyed.sort(key=lambda t: (t[0], t[1]))
    ids = {id(s): (i, key) for i, (_, key, s) in enumerate(keyed)}
    out = []
    for split in SPLITS:
        samples = getattr(splits, split)
        sizes = [os.path.getsize(s.path) for s in samples]
        n = max(1, -(-sum(sizes) // shard_size))
        if split == "train":
            n = max(n, MIN_TRAIN_SHARDS)
        n = min(n, len(samples))
        for k in range(n):
            lo, hi = k * len(samples) // n, (k + 1) * len(samples) // n
            items = tuple(PackItem(ids[id(s)][0], s.label, s.path, ids[id(s)][1])
                          for s in samples[lo:hi])
            out.append(ShardPlan(f"{split}-{k:05d}.tfrecord", split, lo, items,
                                 sum(sizes[lo:hi])))
    return out


def describe(catalog: Catalog, splits: Splits, settings: SplitSettings, max_side: int,
             source: str, created: str, shards: list[Shard]) -> PackedIndex:
    return PackedIndex(classes=list(catalog.classes), split=settings,
                       counts=splits.sizes(), samples=samples_digest(catalog.classes, splits),
                       class_counts=class_counts(len(catalog.classes), splits),
                       max_side=max_side, source=source, created=created, shards=shards,
                       skipped=list(catalog.skipped), image_stats=catalog.image_stats())


def class_counts(num_classes: int, splits: Splits) -> dict[str, list[int]]:
    """Images per class of each split, in class order."""
    out = {}
    for split in SPLITS:
        counts = Counter(s.label for s in getattr(splits, split))
        out[split] = [counts[i] for i in range(num_classes)]
    return out


def same_plan(a: PackedIndex, b: PackedIndex) -> bool:
    """Whether two indexes describe the same samples in the same shards (their bytes aside)."""
    def key(i: PackedIndex) -> tuple:
        return (i.classes, i.split, i.counts, i.samples, i.max_side,
                [(s.name, s.split, s.count, s.first) for s in i.shards])
    return key(a) == key(b)


@dataclass(frozen=True)
class Existing:
    """What index.json a destination already holds."""

    index: PackedIndex | None  # None: damaged, or of a format or version this one can't read
    foreign: str = ""  # the format and version it has, when this trainjob cannot read it


def existing(store: Store) -> Existing | None:
    d = store.read_json(INDEX)
    if d is None:
        return None
    try:
        check_format(d, store.child(INDEX))
    except ConfigError:
        return Existing(None, f"{d.get('format')!r} version {d.get('version')!r}"
                        if isinstance(d, dict) else "not an index")
    try:
        return Existing(PackedIndex.from_dict(d, store.child(INDEX)))
    except TrainJobError:
        return Existing(None)


def _refused(store: Store, found: Existing) -> ConfigError:
    what = (f"a packed dataset of another format ({found.foreign})" if found.foreign else
            "a packed dataset of other data or settings (classes, split, images or "
            "--max-side differ)")
    return ConfigError(f"{store.child(INDEX)} is {what}: give --replace to replace it, or "
                       "pack into another prefix")


def check_settings(store: Store, settings: SplitSettings, max_side: int, replace: bool) -> None:
    """Before the scan: refuse at once to replace, without ``replace``, a packed dataset of
    another format or other split settings or --max-side (``prepare`` compares the images,
    after it)."""
    found = existing(store)
    if found is None or replace:
        return
    if found.foreign or (found.index is not None and
                         (found.index.split, found.index.max_side) != (settings, max_side)):
        raise _refused(store, found)


def prepare(store: Store, wanted: PackedIndex, replace: bool) -> PackedIndex | None:
    """Before building: the index a rerun keeps (the same plan), or None. Another dataset's
    index is refused without ``replace``, else deleted first, as is a damaged one; stored
    shards and records this plan does not name are deleted."""
    found = existing(store)
    current = found.index if found else None
    if found is not None and (found.foreign or current is None or
                              not same_plan(current, wanted)):
        if current is None and not found.foreign:
            log.warning("%s is damaged: packing again", store.child(INDEX))
        elif not replace:
            raise _refused(store, found)
        else:
            log.info("replacing the packed dataset at %s", store.uri)
        store.delete([INDEX])
        current = None
    names = {s.name for s in wanted.shards}
    stale = [o.key for o in store.list()
             if (_SHARD_NAME.fullmatch(o.key) and o.key not in names) or
             (o.key.startswith(RECORDS + "/") and o.key[len(RECORDS) + 1:-5] not in names)]
    if stale:
        log.info("deleting %d shards and records of an earlier pack", len(stale))
        store.delete(stale)
    return current


def stored_record(store: Store, name: str) -> dict | None:
    """The record of shard ``name`` when the stored shard still has its size and ETag."""
    record = store.read_json(record_key(name))
    info = store.read_info(name)
    if not isinstance(record, dict) or info is None:
        return None
    if info.size != record.get("bytes") or info.etag != record.get("etag"):
        return None
    return record


def upload(store: Store, built: Built, count: int) -> None:
    """Store a built shard, then its record (which names the ETag the store gave it)."""
    path = Path(built.path)
    store.put(path, built.name)
    info = store.read_info(built.name)
    store.write_json(record_key(built.name), {
        "inputs": built.inputs, "sha256": built.sha256, "bytes": built.bytes,
        "etag": info.etag if info else "", "count": count, "reencoded": built.reencoded})
    path.unlink(missing_ok=True)


def build_all(store: Store, plans: list[ShardPlan], *, max_side: int, processes: int,
              threads: int, tmp_dir: Path, progress: Callable[[Progress], None],
              before_upload: Callable[[], None] = lambda: None) -> dict[str, Built]:
    """Every shard of ``plans`` built (or found stored intact) and stored, by name.
    ``before_upload`` runs once, before the first shard is sent."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(tmp_dir)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        stored = dict(zip([p.name for p in plans],
                          pool.map(lambda p: stored_record(store, p.name), plans)))
    local = store.root if isinstance(store, LocalStore) else None
    tally = _Tally(plans, progress)
    todo = list(reversed(plans))
    limit = 2 * processes  # shards built or building but not yet stored: bounds the disk
    building: dict[Future, str] = {}
    storing: dict[Future, Built] = {}
    uploads_started = False
    context = multiprocessing.get_context("spawn")  # inherits none of this process's threads
    with (ProcessPoolExecutor(processes, mp_context=context, initializer=watch_parent,
                              initargs=(os.getpid(),)) as builders,
          ThreadPoolExecutor(max_workers=threads) as uploaders):
        try:
            while todo or building or storing:
                while todo and len(building) + len(storing) < limit:
                    p = todo.pop()
                    copy = str(local / p.name) if local and stored[p.name] else None
                    building[builders.submit(build_shard, p, max_side, stored[p.name], copy,
                                             str(tmp_dir))] = p.name
                finished, _ = wait([*building, *storing], return_when=FIRST_COMPLETED)
                for future in finished:
                    if future in storing:
                        future.result()
                        tally.finish(storing.pop(future), reused=False)
                        continue
                    del building[future]
                    built = future.result()
                    if built.path is None:
                        tally.finish(built, reused=True)
                        continue
                    if not uploads_started:
                        before_upload()
                        uploads_started = True
                    count = len(tally.plans[built.name].items)
                    storing[uploaders.submit(upload, store, built, count)] = built
        except BrokenProcessPool as exc:
            raise TrainJobError(f"a packing process died ({exc}): out of memory? Run the "
                                "command again to resume, with fewer --processes") from exc
        except BaseException:
            for future in building:
                future.cancel()
            raise
    return tally.done


class _Tally:
    """The shards done, reported one by one."""

    def __init__(self, plans: list[ShardPlan], progress: Callable[[Progress], None]) -> None:
        self.plans = {p.name: p for p in plans}
        self.progress = progress
        self.done: dict[str, Built] = {}
        self.source_done, self.source_total = 0, sum(p.source_bytes for p in plans)

    def finish(self, built: Built, reused: bool) -> None:
        self.done[built.name] = built
        p = self.plans[built.name]
        self.source_done += p.source_bytes
        shard = Shard(p.name, p.split, len(p.items), built.bytes, built.sha256, p.first)
        self.progress(Progress(shard, reused, built.reencoded, len(self.done), len(self.plans),
                               self.source_done, self.source_total))
        hooks.hold(f"pack_stored:{len(self.done)}")  # tests: a pack caught mid-way


def _remove_dead_temporaries(tmp_dir: Path) -> None:
    """Shard files a killed pack left half written (their process is gone)."""
    for path in tmp_dir.glob("*.tmp"):
        pid = path.suffixes[-2].lstrip(".") if len(path.suffixes) >= 2 else ""
        if not pid.isdigit() or not pid_alive(int(pid)):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class PackResult:
    index: PackedIndex
    reused: int  # shards found stored and intact
    reencoded: int  # images re-encoded
    index_written: bool  # False: an identical index was there already


def pack(catalog: Catalog, splits: Splits, store: Store, *, settings: SplitSettings,
         shard_size: int, max_side: int, processes: int, threads: int, tmp_dir: Path,
         source: str, replace: bool, progress: Callable[[Progress], None]) -> PackResult:
    """Pack ``splits`` of ``catalog`` into ``store``: shards, then index.json, last."""
    plans = plan(catalog, splits, shard_size)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    planned = [Shard(p.name, p.split, len(p.items), 0, "", p.first) for p in plans]
    current = prepare(store, describe(catalog, splits, settings, max_side, source, created,
                                      planned), replace)

    def unfinished() -> None:  # a shard is rebuilt: the index no longer tells the truth
        if current is not None:
            store.delete([INDEX])

    built = build_all(store, plans, max_side=max_side, processes=processes, threads=threads,
                      tmp_dir=tmp_dir, progress=progress, before_upload=unfinished)
    shards = [Shard(p.name, p.split, len(p.items), built[p.name].bytes, built[p.name].sha256,
                    p.first) for p in plans]
    index = describe(catalog, splits, settings, max_side, source, created, shards)
    unchanged = current is not None and all(b.path is None for b in built.values()) and \
        current.to_dict() | {"created": created} == index.to_dict()
    if not unchanged:
        store.write_bytes(INDEX, index.to_json())  # last: the dataset is now complete
    return PackResult(current if unchanged else index,
                      sum(b.path is None for b in built.values()),
                      sum(b.reencoded for b in built.values()), not unchanged)
