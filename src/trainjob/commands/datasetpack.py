"""``trainjob dataset pack``: a dataset packed into shards for training from a bucket."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import click

from trainjob.commands import options
from trainjob.config import DataConfig, SplitConfig
from trainjob.data import packed, packing, source
from trainjob.data.catalog import split
from trainjob.errors import ConfigError
from trainjob.inspect import textfmt
from trainjob.store import hostcache
from trainjob.store.client import redact
from trainjob.store.s3 import S3Store
from trainjob.store.uri import open_store, parse_uri

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1


@click.command(name="pack")
@click.argument("src")
@click.argument("dest")
@options.env_option("--shard-size", name="shard_size", type=options.ByteSize(),
                    default="128MiB", show_default=True,
                    help="About this many bytes of images per shard (512K, 64MB, 128MiB...). "
                    "Each split's shards hold equal counts; the training split gets at least "
                    "16 shards where it has 16 images, so that several workers can each read "
                    "their own.")
@options.env_option("--max-side", name="max_side", type=click.IntRange(min=0), default=512,
                    show_default=True,
                    help="Re-encode images whose long side is at least 1.25 x this to this "
                    "long side (JPEG, quality 95), when that is smaller; 0 stores every file "
                    "as it is. 512 leaves room for 224 px training with crops of 80% of a "
                    "side.")
@options.env_option("--processes", name="processes", type=click.IntRange(min=1),
                    default=usable_cpus, show_default="the usable CPUs",
                    help="Processes building shards (reading and re-encoding images).")
@options.env_option("--replace", "replace", name="replace", is_flag=True,
                    help="Replace a packed dataset of other data or settings at DEST.")
@options.from_config("include_background")
@options.from_config("max_bad_fraction")
@options.from_config("max_extract_bytes")
@options.from_config("seed")
@options.from_config("val_fraction")
@options.from_config("test_fraction")
@options.from_config("train_per_class")
@options.from_config("cache_dir")
@options.threads
def pack(src: str, dest: str, shard_size: int, max_side: int, processes: int, replace: bool,
         include_background: bool, max_bad_fraction: float, max_extract_bytes: int, seed: int,
         val_fraction: float, test_fraction: float, train_per_class: int | None,
         cache_dir: str, threads: int) -> None:
    """Pack the dataset SRC (anything --data takes) into shards under DEST
    (s3://bucket/prefix/ or a local folder), for `trainjob train --data DEST`.

    The images are checked as training checks them (bad files skipped and listed) and split
    as training splits them, once: the split is fixed in DEST/index.json. Shards are
    TFRecord files of tf.train.Example (id, label, split, image, key), built on every core
    and uploaded as they come; index.json is written last. Run the same command again after
    a failure or a kill: it reuses the shards already stored intact and builds the rest."""
    DataConfig(data=src, include_background=include_background, cache_dir=cache_dir,
               max_extract_bytes=max_extract_bytes, max_bad_fraction=max_bad_fraction)
    SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction,
                train_per_class=train_per_class, seed=seed)
    check_places(src, dest)
    if packed.packed_store(src, threads) is not None:
        raise ConfigError(f"SRC {src} is a packed dataset already: train on it with --data")
    store = open_store(dest, threads)
    if isinstance(store, S3Store):
        store.check_bucket()
    settings = packed.SplitSettings(seed, val_fraction, test_fraction, train_per_class,
                                    include_background)
    packing.check_settings(store, settings, max_side, replace)
    started = time.monotonic()
    with hostcache.session():
        catalog, _ = source.load_catalog(
            src, Path(cache_dir), include_background=include_background,
            max_extract_bytes=max_extract_bytes, max_bad_fraction=max_bad_fraction,
            threads=threads, scan_threads=source.scan_threads())
        splits = split(catalog, val_fraction=val_fraction, test_fraction=test_fraction,
                       train_per_class=train_per_class, seed=seed)
        scanned = time.monotonic()
        tmp = Path(cache_dir) / "packing" / hashlib.sha1(store.uri.encode()).hexdigest()[:16]
        result = packing.pack(
            catalog, splits, store, settings=settings, shard_size=shard_size, max_side=max_side,
            processes=processes, threads=threads, tmp_dir=tmp, source=redact(src),
            replace=replace, progress=reporter(store.uri))
    index = result.index
    total = sum(s.bytes for s in index.shards)
    log.info("packed in %.1f s (scan %.1f s): %d of %d shards were stored already, %d "
             "images re-encoded", time.monotonic() - started, scanned - started,
             result.reused, len(index.shards), result.reencoded)
    counts = ", ".join(f"{name} {n}" for name, n in index.counts.items())
    click.echo(f"{store.uri}/: {sum(index.counts.values())} images ({counts}) in "
               f"{len(index.shards)} shards ({textfmt.size(total)}); train with --data "
               f"{store.uri}/")


def check_places(src: str, dest: str) -> None:
    """Usage errors found before any I/O: a local SRC that is not there, a DEST that is not
    a prefix, or one inside SRC (a rerun would scan the shards)."""
    s_scheme, s_bucket, s_key = parse_uri(src)
    d_scheme, d_bucket, d_key = parse_uri(dest)
    if s_scheme == "file" and not Path(s_key).expanduser().exists():
        raise ConfigError(f"SRC {src}: no such file or folder")
    if d_scheme == "file" and Path(d_key).expanduser().is_file():
        raise ConfigError(f"DEST {dest} is a file: give a folder (or s3://bucket/prefix/)")
    if d_scheme == "s3" and d_key.lower().endswith((".zip", ".tar", ".tgz", ".gz", ".json")):
        raise ConfigError(f"DEST {dest} names a file: give a prefix, s3://bucket/prefix/")
    if s_scheme == d_scheme and s_bucket == d_bucket:
        if s_scheme == "file":
            inside = Path(d_key).expanduser().resolve().is_relative_to(
                Path(s_key).expanduser().resolve())
        else:
            inside = PurePosixPath(d_key or "/").is_relative_to(PurePosixPath(s_key or "/")) \
                if not s_key.lower().endswith((".zip", ".tar", ".tgz", ".gz")) else False
        if inside:
            raise ConfigError(f"DEST {dest} is inside SRC {src}: pack into another prefix")


def reporter(uri: str) -> Callable[[packing.Progress], None]:
    """Progress: a bar on a terminal, else one line per shard (logs)."""
    stream = sys.stderr
    bar = textfmt.ProgressReporter(f"packing {uri}", stream, tty=True) if stream.isatty() \
        else None

    def show(p: packing.Progress) -> None:
        if bar is not None:
            bar(p.source_done, p.source_total)
            return
        state = "already stored" if p.reused else "stored"
        again = f", {p.reencoded} re-encoded" if p.reencoded else ""
        click.echo(f"[{p.done}/{p.total}] {p.shard.name}: {p.shard.count} images, "
                   f"{textfmt.size(p.shard.bytes)} ({state}{again})", err=True)

    return show
