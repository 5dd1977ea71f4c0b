"""The local mirror of a prefix: download what is new or changed, many objects at once,
delete what is gone from the bucket, and keep the cache index (cacheindex.py) in step.
"""

from __future__ import annotations

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

from trainjob.cacheindex import CacheIndex, OutOfOrder, Row, merge
from trainjob.errors import StorageError
from trainjob.transfer import ObjectReader

log = logging.getLogger(__name__)

MiB = 1024**2
FLUSH_ROWS, FLUSH_SECONDS = 2000, 2.0  # how often completed downloads reach the index
PROGRESS_SECONDS = 30.0


@dataclass
class Counts:
    downloaded_objects: int = 0
    downloaded_bytes: int = 0
    cached_objects: int = 0
    removed_objects: int = 0


def sync_prefix(reader: ObjectReader, rows: Iterable[Row], relist: Callable[[], list[Row]],
                base: str, local_root: Path, index: CacheIndex, threads: int) -> Counts:
    """Make ``local_root`` mirror the listed objects (``rows``: key relative to ``base``,
    ETag, size, in key order): download what is new or changed, delete what is gone."""
    if index.start_sync():
        index.sweep(local_root)
    counts = Counts()
    try:
        try:
            gone = _pull(reader, rows, base, local_root, index, threads, counts)
        except OutOfOrder as exc:
            log.warning("s3://%s/%s: the server lists keys out of order (%s); sorting the "
                        "listing in memory instead", reader.bucket, base, exc)
            index.settle()
            first, counts = counts, Counts()
            gone = _pull(reader, sorted(relist()), base, local_root, index, threads, counts)
            counts.downloaded_objects += first.downloaded_objects
            counts.downloaded_bytes += first.downloaded_bytes
            counts.cached_objects -= first.downloaded_objects
        _remove(local_root, gone, f"s3://{reader.bucket}/{base}")
        index.forget(gone)
        counts.removed_objects = len(gone)
    finally:
        index.settle()
    index.finish_sync()
    return counts


def sync_object(reader: ObjectReader, key: str, etag: str, size: int, rel: str,
                local_root: Path, index: CacheIndex) -> Counts:
    """Make ``local_root/rel`` hold object ``key``, unless the cache already does."""
    dest = _local_path(local_root, rel, f"s3://{reader.bucket}/{key}")
    if index.lookup(rel) == (etag, size) and _has_size(dest, size):
        return Counts(cached_objects=1)
    _make_folder(dest.parent)
    got = reader.download(key, size, etag, dest)
    index.record([(rel, *got)])
    index.settle()
    return Counts(downloaded_objects=1, downloaded_bytes=got[1])


def _pull(reader: ObjectReader, rows: Iterable[Row], base: str, local_root: Path,
          index: CacheIndex, threads: int, counts: Counts) -> list[str]:
    gone: list[str] = []
    made: set[Path] = set()

    def todo() -> Iterator[tuple[str, str, str, int, Path]]:
        for (rel, etag, size), held in merge(rows, index.rows(), gone):
            dest = _local_path(local_root, rel, f"s3://{reader.bucket}/{base}{rel}")
            if held == (etag, size) and _has_size(dest, size):
                counts.cached_objects += 1
                continue
            if dest.parent not in made:  # one mkdir per folder, not per object
                _make_folder(dest.parent)
                made.add(dest.parent)
            yield base + rel, rel, etag, size, dest

    _download_all(reader, todo(), threads, index, counts)
    return gone


def _download_all(reader: ObjectReader, jobs: Iterator[tuple[str, str, str, int, Path]],
                  threads: int, index: CacheIndex, counts: Counts) -> None:
    """Run ``jobs`` on ``threads`` workers, a bounded number queued at a time, journaling
    each completed file in the index in batches (at most FLUSH_SECONDS apart)."""
    slots = threading.Semaphore(threads * 4)
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    batch: list[Row] = []
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
               dest: Path) -> Row:
    got_etag, got_size = reader.download(key, size, etag, dest)
    return rel, got_etag, got_size


def _local_path(root: Path, rel: str, where: str) -> Path:
    # Lexical, so it costs no system call per object: keys come from the bucket, and the
    # folders under root are ours (an S3 key cannot make a symlink).
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or norm in (".", "..") or norm.startswith("../"):
        raise StorageError(f"{where}: object key escapes the cache folder; refusing it")
    return root / rel


def _has_size(path: Path, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {folder}: {exc.strerror or exc} (does an object "
                           "share its name with a folder of keys?)") from exc


def _remove(root: Path, rels: list[str], where: str) -> None:
    """Delete the copies of objects gone from the bucket, then the folders left empty."""
    folders: set[Path] = set()
    for rel in rels:
        path = _local_path(root, rel, where + rel)
        path.unlink(missing_ok=True)
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != root and folder.is_relative_to(root):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or already gone): its parents are not empty either
            folder = folder.parent
