"""The download cache: S3 objects mirrored under ``<cache>/s3/<bucket>/<key>``, checked
against an index of ETag, size and mtime (``cacheindex``), downloaded many at once
(``transfer``), and shared by the jobs on one host.

A prefix's mirror is synced in one pass: the bucket listing, in key order, is merged with
the index, also in key order; what is new or changed is downloaded while the listing goes
on, and what is gone from the bucket is deleted. Memory stays flat at millions of objects.

One job updates a mirror while the others wait (``hostcache.ensure``). A prefix's mirror, which
training reads all run long, stays locked (shared) for the run within a ``hostcache.session()``,
so no other job rewrites or prunes it under a running one.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import posixpath
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainjob.errors import DataError, StorageError
from trainjob.store import hostcache
from trainjob.store.cacheindex import CacheIndex, Entry, OutOfOrder, Row, intact, merge
from trainjob.store.transfer import ObjectReader

if TYPE_CHECKING:  # storage imports this module: no import back at run time
    from trainjob.store.base import ObjectInfo
    from trainjob.store.s3 import S3Store


log = logging.getLogger(__name__)


MiB = 1024**2


FLUSH_ROWS, FLUSH_SECONDS = 2000, 2.0  # how often completed downloads reach the index


PROGRESS_SECONDS = 30.0


@dataclass
class FetchResult:
    path: Path
    downloaded_objects: int = 0
    downloaded_bytes: int = 0
    cached_objects: int = 0
    removed_objects: int = 0


def mirror_prefix(store: S3Store, base: str, cache_dir: Path, threads: int,
                  uri: str) -> FetchResult:
    """Make ``<cache>/s3/<bucket>/<base>`` mirror the objects under ``base``, and hold it
    (shared) for the session."""
    local_root = cache_dir / "s3" / store.bucket / base
    cut, result = len(base), FetchResult(local_root)

    def rows() -> Iterator[Row]:
        listing = store.iter_list(base)
        first = next(listing, None)
        if first is None:
            raise DataError(f"{uri} holds no objects: check the prefix "
                            "(it should hold class folders or an archive)")
        return ((o.key[cut:], o.etag, o.size) for o in itertools.chain([first], listing))

    def ready() -> bool:  # under a shared lock: reads only, stops at the first difference
        result.cached_objects = up_to_date(rows(), index) or 0
        return result.cached_objects > 0

    def build() -> None:  # under the exclusive lock
        counts = sync_prefix(reader, rows(), lambda: [(o.key[cut:], o.etag, o.size)
                                                      for o in store.list(base)],
                             base, index, threads)
        vars(result).update(vars(counts))

    reader = ObjectReader(store.client, store.bucket, store.transfer, threads)
    try:
        with CacheIndex.for_prefix(cache_dir, store.bucket, base) as index:
            _ensure(local_root, ready, build, cache_dir, "prefix", store.bucket, base)
    finally:
        reader.close()
    return result


def mirror_object(store: S3Store, info: ObjectInfo, base: str, cache_dir: Path,
                  threads: int) -> FetchResult:
    """Make ``<cache>/s3/<bucket>/<key>`` hold the object ``info`` describes."""
    local_root = cache_dir / "s3" / store.bucket / base
    rel = info.key[len(base):]
    result = FetchResult(local_root / rel)

    def ready() -> bool:
        held = index.lookup(rel)
        result.cached_objects = int(bool(held) and held[:2] == (info.etag, info.size)
                                    and intact(local_root / rel, info.size, held[2]))
        return bool(result.cached_objects)

    def build() -> None:
        vars(result).update(vars(sync_object(reader, info.key, info.etag, info.size, rel,
                                             index)))

    reader = ObjectReader(store.client, store.bucket, store.transfer, threads)
    try:
        with CacheIndex.for_prefix(cache_dir, store.bucket, base) as index:
            # Not held: nothing reads an archive after its extraction.
            _ensure(local_root, ready, build, cache_dir, "object", store.bucket, base)
    finally:
        reader.close()
    return result


def _ensure(local_root: Path, ready: Callable[[], bool], build: Callable[[], None],
            cache_dir: Path, kind: str, bucket: str, base: str) -> None:
    # One lock per kind: a job holding a prefix's mirror can still fetch weights beside it.
    digest = hashlib.sha1(f"{bucket}/{base}".encode()).hexdigest()
    hostcache.ensure(local_root, ready=ready, build=build, hold=kind == "prefix",
                 lock_file=cache_dir / "locks" / f"{kind}-{digest}.lock")


def up_to_date(rows: Iterable[Row], index: CacheIndex) -> int | None:
    """The number of listed objects if the mirror holds exactly them, intact, and its last
    sync finished; else None, as soon as a difference shows."""
    if index.dirty():
        return None
    gone: list[str] = []
    root, count = f"{index.root}{os.sep}", 0
    try:
        for (rel, etag, size), held in merge(rows, index.rows(), gone):
            if gone or not (held and held[0] == etag and held[1] == size
                            and intact(root + rel, size, held[2])):
                return None
            count += 1
    except OutOfOrder:
        return None  # the sync copes
    return None if gone else count


def sync_prefix(reader: ObjectReader, rows: Iterable[Row], relist: Callable[[], list[Row]],
                base: str, index: CacheIndex, threads: int) -> FetchResult:
    """Make the index's folder mirror the listed objects (``rows``: key relative to ``base``,
    ETag, size, in key order): download what is new or changed, delete what is gone."""
    if index.start_sync():
        index.sweep()
    local_root = index.root
    counts = FetchResult(local_root)
    try:
        try:
            gone = _pull(reader, rows, base, local_root, index, threads, counts)
        except OutOfOrder as exc:
            log.warning("s3://%s/%s: the server lists keys out of order (%s); sorting the "
                        "listing in memory instead", reader.bucket, base, exc)
            index.settle()
            first, counts = counts, FetchResult(local_root)
            gone = _pull(reader, sorted(relist()), base, local_root, index, threads, counts)
            counts.downloaded_objects += first.downloaded_objects
            counts.downloaded_bytes += first.downloaded_bytes
            counts.cached_objects -= first.downloaded_objects
        _remove(local_root, gone, reader.bucket, base)
        index.forget(gone)
        counts.removed_objects = len(gone)
    finally:
        index.settle()
    index.finish_sync()
    return counts


def sync_object(reader: ObjectReader, key: str, etag: str, size: int, rel: str,
                index: CacheIndex) -> FetchResult:
    """Make ``rel`` in the index's folder hold object ``key``, unless it already does."""
    local_root = index.root
    _check_key(rel, reader.bucket, key[:len(key) - len(rel)])
    dest = local_root / rel
    held = index.lookup(rel)
    if held and held[:2] == (etag, size) and intact(dest, size, held[2]):
        return FetchResult(dest, cached_objects=1)
    _make_folder(dest.parent)
    entry = _fetch_one(reader, key, rel, etag, size, dest)
    index.record([entry])
    index.settle()
    return FetchResult(dest, downloaded_objects=1, downloaded_bytes=entry[2])


def _pull(reader: ObjectReader, rows: Iterable[Row], base: str, local_root: Path,
          index: CacheIndex, threads: int, counts: FetchResult) -> list[str]:
    gone: list[str] = []
    made: set[Path] = set()

    root = f"{local_root}{os.sep}"

    def todo() -> Iterator[tuple[str, str, str, int, Path]]:
        # Plain strings until an object needs downloading: at a million cached objects,
        # building Path objects would cost more than the stat calls.
        for (rel, etag, size), held in merge(rows, index.rows(), gone):
            _check_key(rel, reader.bucket, base)
            if held and held[0] == etag and held[1] == size and intact(root + rel, size, held[2]):
                counts.cached_objects += 1
                continue
            dest = local_root / rel
            if dest.parent not in made:  # one mkdir per folder, not per object
                _make_folder(dest.parent)
                made.add(dest.parent)
            yield base + rel, rel, etag, size, dest

    _download_all(reader, todo(), threads, index, counts)
    return gone


def _download_all(reader: ObjectReader, jobs: Iterator[tuple[str, str, str, int, Path]],
                  threads: int, index: CacheIndex, counts: FetchResult) -> None:
    """Run ``jobs`` on ``threads`` workers, a bounded number queued at a time, journaling
    each completed file in the index in batches (at most FLUSH_SECONDS apart)."""
    slots = threading.Semaphore(threads * 4)
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    batch: list[Entry] = []
    state = {"submitted": 0, "collected": 0, "flushed": time.monotonic(),
             "reported": time.monotonic()}
    errors: list[BaseException] = []

    def on_done(future: Future) -> None:
        finished.put(future)
        slots.release()

    def collect(block: bool) -> None:
        while state["collected"] < state["submitted"]:
            try:
                future = finished.get(block=block)
            except queue.Empty:
                break
            state["collected"] += 1
            if future.cancelled():
                continue
            if future.exception() is not None:
                errors.append(future.exception())
                continue
            row = future.result()
            batch.append(row)
            counts.downloaded_objects += 1
            counts.downloaded_bytes += row[2]
        now = time.monotonic()
        if len(batch) >= FLUSH_ROWS or now - state["flushed"] >= FLUSH_SECONDS:
            index.record(batch)
            batch.clear()
            state["flushed"] = now
        if now - state["reported"] >= PROGRESS_SECONDS:
            log.info("downloaded %d objects (%.1f MiB) so far", counts.downloaded_objects,
                     counts.downloaded_bytes / MiB)
            state["reported"] = now

    pool = ThreadPoolExecutor(threads, thread_name_prefix="fetch")
    try:
        for key, rel, etag, size, dest in jobs:
            slots.acquire()
            collect(block=False)
            if errors:
                break
            future = pool.submit(_fetch_one, reader, key, rel, etag, size, dest)
            state["submitted"] += 1
            future.add_done_callback(on_done)
        while state["collected"] < state["submitted"] and not errors:
            collect(block=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        collect(block=True)  # everything has finished: record what succeeded
        index.record(batch)
    if errors:
        raise errors[0]


def _fetch_one(reader: ObjectReader, key: str, rel: str, etag: str, size: int,
               dest: Path) -> Entry:
    got_etag, got_size = reader.download(key, size, etag, dest)
    try:  # the mtime it got at its last write, which a later replacement changes
        mtime = os.stat(dest).st_mtime_ns
    except OSError as exc:
        raise StorageError(f"cannot read {dest} back: {exc.strerror or exc}") from exc
    return rel, got_etag, got_size, mtime


def _check_key(rel: str, bucket: str, base: str) -> None:
    """Refuse a key whose local copy would land outside the mirror's folder. Lexical, so it
    costs no system call: the folders under the mirror are ours, and a key makes no symlink."""
    if not rel.startswith("/") and ".." not in rel and rel not in ("", "."):
        return
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or norm in (".", "..") or norm.startswith("../"):
        raise StorageError(f"s3://{bucket}/{base}{rel}: object key escapes the cache "
                           "folder; refusing it")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {folder}: {exc.strerror or exc} (does an object "
                           "share its name with a folder of keys?)") from exc


def _remove(root: Path, rels: list[str], bucket: str, base: str) -> None:
    """Delete the copies of objects gone from the bucket, then the folders left empty."""
    folders: set[Path] = set()
    for rel in rels:
        _check_key(rel, bucket, base)
        path = root / rel
        path.unlink(missing_ok=True)
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != root and folder.is_relative_to(root):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or already gone): its parents are not empty either
            folder = folder.parent
