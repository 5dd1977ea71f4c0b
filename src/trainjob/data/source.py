"""From a dataset URI to a checked catalog: fetch (cached), unpack, find the class root,
check every file. ``train`` and ``dataset inspect`` both go through ``load_catalog``, so
what inspect reports is what training would use."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from trainjob.data import archives
from trainjob.data.catalog import Catalog, Dataset, Splits, check_files, check_usable, locate
from trainjob.data.packed import VERSION, read_index
from trainjob.data.stream import Packed
from trainjob.store import fetch
from trainjob.store.base import Store
from trainjob.store.mirror import FetchResult

log = logging.getLogger(__name__)

Timer = Callable[[str], AbstractContextManager]


def scan_threads() -> int:
    """Image checks are CPU-bound (PIL decodes): a thread per core, at most 8."""
    return min(8, os.cpu_count() or 2)


def _untimed(phase: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def load_catalog(uri: str, cache_dir: Path, *, include_background: bool,
                 max_extract_bytes: int, max_bad_fraction: float | None, threads: int,
                 scan_threads: int, timed: Timer = _untimed) -> tuple[Catalog, FetchResult]:
    """The catalog of the dataset at ``uri`` and how it was fetched.

    ``max_bad_fraction`` None leaves out the verdict (``check_usable``): every
    file is checked and reported, however many are bad. ``timed(phase)`` wraps each phase.
    """
    with timed("download"):
        fetched = fetch.fetch(uri, cache_dir / "downloads", threads)
    with timed("unpack"):
        roots = archives.unpack(fetched.path, cache_dir / "extracted", max_extract_bytes)
        class_root = locate(roots)
    with timed("scan"):
        catalog = check_files(class_root, cache_dir / "converted",
                                       include_background=include_background,
                                       threads=scan_threads)
        if max_bad_fraction is not None:
            check_usable(catalog, max_bad_fraction)
    return catalog, fetched


def load_packed(store: Store, asked: dict) -> Dataset:
    """The packed dataset in ``store``, from its index alone (nothing is downloaded or
    scanned: the shards are streamed as training reads them). ``asked``: the job's split
    settings; those that differ from the ones the dataset was packed with are named in a
    warning, since the split was fixed at pack time."""
    index = read_index(store)
    fixed = dataclasses.asdict(index.split)
    ignored = [f"--{k.replace('_', '-')} {asked[k]}" for k in sorted(asked)
               if k in fixed and k != "seed" and asked[k] != fixed[k]]
    if ignored:
        log.warning("%s was split when it was packed (%s): %s do(es) not apply; pack it "
                    "again to split it otherwise", store.uri,
                    ", ".join(f"{k} {v}" for k, v in fixed.items()), ", ".join(ignored))
    catalog = Catalog(Path(store.uri), index.classes, [], skipped=index.skipped)
    totals = [sum(c) for c in zip(*index.class_counts.values())]
    summary = {"packed": {"uri": store.uri, "format_version": VERSION, "split": fixed,
                          "shards": {split: len(index.split_shards(split))
                                     for split in index.counts},
                          "bytes": sum(s.bytes for s in index.shards),
                          "max_side": index.max_side, "created": index.created},
               "classes": len(index.classes), "images": sum(index.counts.values()),
               "class_counts": dict(zip(index.classes, totals)),
               "skipped": len(index.skipped), "skipped_files": index.skipped,
               "image_stats": index.image_stats, "splits": dict(index.counts)}
    log.info("packed dataset %s: %d classes, %d images in %d shards: %s", store.uri,
             len(index.classes), summary["images"], len(index.shards), index.counts)
    return Dataset(catalog, Splits([], [], []), summary, Packed(store, index))


@dataclass(frozen=True)
class PublishedArchive:
    """A dataset as its authors publish it: where, how big, its md5."""

    url: str
    size: int
    md5: str
    filename: str


PUBLISHED = {
    "caltech101": PublishedArchive(
        url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
        size=137_414_764, md5="3138e1922a9193bfa496528edbbc45d0",
        filename="caltech-101.zip"),
}
