"""The tf.data pipeline: read -> decode -> resize -> cache -> shuffle -> augment -> batch -> prefetch.

The training stream spans all remaining epochs, and each epoch's order and augmentation are
seeded by (seed, epoch). A run resumed at epoch k therefore sees exactly the batches an
uninterrupted run would have seen from epoch k on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import tensorflow as tf

from trainjob.data.catalog import Sample
from trainjob.store import hostcache as cache_lib

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE
MIN_ZOOM = 0.8  # random crops keep at least 80% of each side
DECODE = "jpeg-accurate"  # in the file cache's key: caches of an older decode are not reused


def decoded(samples: list[Sample], image_size: int, cache: str, cache_dir: Path,
            name: str) -> tf.data.Dataset:
    """(uint8 image, label) pairs, resized and cached; the expensive part, done once."""
    if cache == "auto":
        cache = choose_pipeline_cache(len(samples), image_size, name)
    paths = [s.path for s in samples]
    labels = [s.label for s in samples]
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))

    ds = ds.map(lambda path, label: (decode_image(path, image_size), label),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    if cache == "memory":
        return ds.cache()
    if cache == "file":
        cache_dir.mkdir(parents=True, exist_ok=True)
        prefix = cache_dir / f"{name}-{fingerprint_files(paths, image_size)}"
        lock = cache_lib.FolderLock(cache_lib.lock_file_for(prefix))
        if lock.acquire(exclusive=True, wait=False):
            # No other job on this host uses this cache: a TF lockfile is a killed writer's.
            for stale in cache_dir.glob(f"{prefix.name}_*.lockfile"):
                stale.unlink()
            lock.share()
        elif prefix.with_name(f"{prefix.name}.index").exists():
            lock.acquire(exclusive=False)  # complete: read it beside the other job
        else:
            log.warning("another job on this host is writing the file cache %s; caching %s in "
                        "memory for this run", prefix, name)
            return ds.cache()
        cache_lib.keep(lock)  # held for the run within a cache.session()
        return ds.cache(str(prefix))
    return ds


def decode_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One image file (RGB or grayscale, as ``datasets.check_image`` leaves it) as uint8
    RGB, resized to image_size x image_size: every split's decode, and ``trainjob
    predict``'s, so a prediction sees exactly the pixels evaluation sees."""
    data = tf.io.read_file(path)
    # JPEG with the accurate IDCT: TensorFlow's default (the fast one) is up to 8 levels off
    # the colours Pillow (and libjpeg's default) decode, at sharp edges.
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    # uint8 halves the memory of the cache against float16 and is exact for 0-255 input.
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def fingerprint_files(paths: list[str], image_size: int) -> str:
    """Key of a file cache: every path with its size and mtime, so that images replaced in
    place (a prefix synced again) are decoded anew, never served stale."""
    digest = hashlib.sha1(f"{image_size}:{DECODE}".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"\n{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def steps_for(n: int, batch_size: int, steps_per_epoch: int | None) -> int:
    return steps_per_epoch or max(1, math.ceil(n / batch_size))


def training_stream(base: tf.data.Dataset, n: int, num_classes: int, *, image_size: int,
                    batch_size: int, steps: int, repeat: bool, shuffle: bool, augment: bool,
                    seed: int, first_epoch: int, epochs: int,
                    skip_batches: int = 0, shard: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
    """Batches for epochs [first_epoch, epochs): exactly ``steps`` batches per epoch, less
    ``skip_batches`` already trained in ``first_epoch`` (a mid-epoch resume).

    ``shard=(index, count)``: this worker's share of every epoch, element i of the epoch's
    order going to worker i % count. Every worker shuffles with the same seed, so the
    shards are disjoint and an element is augmented as it would be on one worker."""
    index, count = shard

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        ds = base.repeat() if repeat else base
        if shuffle:
            ds = ds.shuffle(min(n, 10_000), seed=seed * 100_003 + epoch,
                            reshuffle_each_iteration=False)
        ds = ds.enumerate()
        if count > 1:
            ds = ds.filter(lambda i, _xy: i % count == index)
        if augment:
            ds = ds.map(lambda i, xy: (augment_image(xy[0], tf.stack([seed + epoch, i]),
                                                     image_size), xy[1]),
                        num_parallel_calls=AUTOTUNE, deterministic=True)
        else:
            ds = ds.map(lambda i, xy: xy)
        ds = ds.batch(batch_size).take(steps)
        return ds.skip(tf.where(epoch == first_epoch, tf.constant(skip_batches, tf.int64), 0))

    stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return _finish(stream, num_classes)


def evaluation_stream(base: tf.data.Dataset, num_classes: int, batch_size: int) -> tf.data.Dataset:
    return _finish(base.batch(batch_size), num_classes)


def _finish(ds: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)),
                num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def augment_image(image: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """Random horizontal flip and random crop-and-zoom, deterministic in ``seed``."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    scale = tf.random.stateless_uniform([], seeds[1], MIN_ZOOM, 1.0)
    side = tf.cast(tf.round(scale * image_size), tf.int32)
    image = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), seeds[2])
    image = tf.image.resize(image, [image_size, image_size])
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# --- --pipeline-cache auto --------------------------------------------------------------------

# Of the RAM, what in-memory caches may take (the --pipeline-cache help quotes it); the rest is
# for TensorFlow, the model, the shuffle buffer and prefetching.
MEMORY_FRACTION = 0.4
IMAGE_OVERHEAD = 64  # bytes per cached element beyond its pixels (label, tensor headers)


class MemoryBudget:
    """What in-memory pipeline caches of this process may hold: ``fraction`` of the RAM
    (the container's limit where lower), less what earlier caches were granted, so the
    training and validation sets together stay within it."""

    def __init__(self, ram_bytes: int | None = None, fraction: float = MEMORY_FRACTION) -> None:
        self.ram_bytes, self.source = (ram_bytes, "as given") if ram_bytes else memory_limit()
        self.fraction = fraction
        self.granted = 0

    @property
    def left(self) -> int:
        return max(0, int(self.ram_bytes * self.fraction) - self.granted)


_budget: MemoryBudget | None = None


def choose_pipeline_cache(count: int, image_size: int, name: str = "train",
                          budget: MemoryBudget | None = None) -> str:
    """``--pipeline-cache auto``: 'memory' when ``count`` decoded images of ``image_size``
    px fit in the budget, else 'file' (under the work dir), so that no dataset gets the job
    OOM-killed by default. Logs the choice and why."""
    global _budget
    if budget is None:
        budget = _budget = _budget or MemoryBudget()
    need = count * (image_size * image_size * 3 + IMAGE_OVERHEAD)
    facts = (f"{count:,} images at {image_size} px take {need / 2**30:.2f} GiB decoded; "
             f"{budget.left / 2**30:.2f} GiB left of {budget.fraction:.0%} of "
             f"{budget.ram_bytes / 2**30:.1f} GiB RAM ({budget.source})")
    if need <= budget.left:
        budget.granted += need
        log.info("pipeline cache for %s: in memory (%s)", name, facts)
        return "memory"
    log.info("pipeline cache for %s: a file under the work dir, since it does not fit in "
             "memory (%s)", name, facts)
    return "file"


def memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup"),
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, str]:
    """(bytes, where that figure comes from): physical RAM, or the cgroup's memory limit
    where lower, as in a container (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    best = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical")
    files = [cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"]
    try:  # the process's own cgroup, where the root's files are not its limit
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                files.append(cgroup_root / path.lstrip("/") / "memory.max")
            elif "memory" in controllers.split(","):
                files.append(cgroup_root / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    for file in files:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < best[0]:  # "max" (v2) or huge (v1): no limit
            best = (int(text), f"cgroup limit, {file}")
    return best
