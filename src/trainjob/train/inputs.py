"""The tf.data pipelines.

Training: encoded files -> cache (the bytes) -> shuffle -> batch -> decode, window, flip,
one resize of each image (``augment.train_batch``) -> prefetch. Validation and test:
decode -> antialiased resize (``augment.eval_image``) -> cache (the pixels) -> batch.

The training stream spans all remaining epochs; each epoch's order is seeded by (seed, epoch)
and each image's augmentation by (seed, epoch, sample id), the id being the sample's index in
``splits.train``. A run resumed at epoch k, or mid-epoch, therefore sees exactly the batches
an uninterrupted run would have seen from there on, and an image is augmented alike whatever
its position and whichever worker reads it.
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
from trainjob.train.augment import eval_image, train_batch

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE
DECODE = "jpeg-accurate"  # in the file cache's key: caches of an older decode are not reused
READ_BATCH = 64  # files read per tf.data call in epoch 1


def decoded(samples: list[Sample], image_size: int, cache: str, cache_dir: Path,
            name: str) -> tf.data.Dataset:
    """(uint8 image, label) pairs as evaluation sees them (``decode_image``), cached as
    ``cache`` says: the validation and test streams, and the training images BatchNorm is
    recalibrated on."""
    if cache == "auto":
        cache = choose_pipeline_cache(len(samples), image_size, name)
    paths = [s.path for s in samples]
    ds = tf.data.Dataset.from_tensor_slices((paths, [s.label for s in samples]))
    ds = ds.map(lambda path, label: (decode_image(path, image_size), label),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    return _cached(ds, cache, cache_dir, f"{name}-{fingerprint_files(paths, image_size)}"
                   if cache == "file" else "")


def encoded(samples: list[Sample], cache: str, cache_dir: Path, name: str) -> tf.data.Dataset:
    """(encoded bytes, label, sample id) of every sample, the id being its index in
    ``samples``; cached as bytes (about a quarter of the decoded pixels at 224 px): the
    training stream decodes them anew each epoch, in its own window."""
    paths = [s.path for s in samples]
    if cache == "auto":
        cache = choose_pipeline_cache(len(samples), 0, name,
                                      encoded_bytes=sum(os.stat(p).st_size for p in paths))
    ds = tf.data.Dataset.from_tensor_slices(
        (paths, [s.label for s in samples], tf.range(len(samples), dtype=tf.int64)))
    # Read in batches, one tf.data call each (as augment.train_batch decodes): an element
    # of its own per file cost more in hand-offs between threads than the read itself.
    ds = ds.batch(READ_BATCH).map(lambda path, label, i: (read_files(path), label, i),
                                  num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()
    return _cached(ds, cache, cache_dir, f"{name}-{fingerprint_files(paths, 'encoded')}"
                   if cache == "file" else "")


def read_files(paths: tf.Tensor) -> tf.Tensor:
    """The bytes of each file of ``paths`` (shape [n]), in one op call of the caller's."""
    return tf.map_fn(tf.io.read_file, paths, fn_output_signature=tf.string)


def _cached(ds: tf.data.Dataset, cache: str, cache_dir: Path, key: str) -> tf.data.Dataset:
    """``ds`` cached in memory, in the file ``cache_dir/key``, or not at all."""
    if cache == "memory":
        return ds.cache()
    if cache != "file":
        return ds
    cache_dir.mkdir(parents=True, exist_ok=True)
    prefix = cache_dir / key
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
                    "memory for this run", prefix, key.rsplit("-", 1)[0])
        return ds.cache()
    cache_lib.keep(lock)  # held for the run within a cache.session()
    return ds.cache(str(prefix))


def decode_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One image file (RGB or grayscale, as ``datasets.check_image`` leaves it) as uint8
    RGB, resized (antialiased) to image_size x image_size: the validation and test splits'
    decode, and ``trainjob predict``'s, so a prediction sees exactly the pixels evaluation
    sees."""
    return eval_image(tf.io.read_file(path), image_size)


def fingerprint_files(paths: list[str], what: int | str) -> str:
    """Key of a file cache of ``what`` (an image size: the decoded pixels; "encoded": the
    files' bytes): every path with its size and mtime, so that images replaced in place (a
    prefix synced again) are read anew, never served stale."""
    digest = hashlib.sha1((f"{what}:{DECODE}" if isinstance(what, int) else what).encode())
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
    """Batches for epochs [first_epoch, epochs) from ``base``'s (encoded bytes, label, sample
    id) elements (``encoded``): exactly ``steps`` batches per epoch, less ``skip_batches``
    already trained in ``first_epoch`` (a mid-epoch resume; skipped before they are decoded).

    ``shard=(index, count)``: this worker's share of every epoch, element i of the epoch's
    order going to worker i % count. Every worker shuffles with the same seed, so the
    shards are disjoint; the augmentation depends on the sample, not on its position."""
    index, count = shard

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        if repeat:  # the data wraps: the how-manieth pass over it tells a sample's draws apart
            ds = base.repeat().enumerate().map(lambda j, e: (*e, j // n))
        else:
            ds = base.map(lambda data, label, i: (data, label, i, tf.constant(0, tf.int64)))
        if shuffle:
            ds = ds.shuffle(min(n, 10_000), seed=seed * 100_003 + epoch,
                            reshuffle_each_iteration=False)
        if count > 1:
            ds = ds.enumerate().filter(lambda i, _e: i % count == index).map(lambda _i, e: e)
        skip = tf.where(epoch == first_epoch, tf.constant(skip_batches, tf.int64), 0)
        ds = ds.skip(skip * batch_size).batch(batch_size).take(steps - skip)
        return ds.map(
            lambda data, label, i, draw: (train_batch(data, i, draw, epoch, seed=seed,
                                                      image_size=image_size, augment=augment),
                                          label),
            num_parallel_calls=AUTOTUNE, deterministic=True)

    stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    # The pixels stay uint8: the model casts them to its input's float32 (Keras converts
    # inputs to the Input's dtype), on the accelerator where there is one, which gets a
    # quarter of the bytes; the input pipeline saves 4-5% of its CPU time per image.
    return finish(stream, num_classes, pixels=tf.uint8)


def evaluation_stream(base: tf.data.Dataset, num_classes: int, batch_size: int) -> tf.data.Dataset:
    return finish(base.batch(batch_size), num_classes)


def finish(ds: tf.data.Dataset, num_classes: int,
           pixels: tf.DType = tf.float32) -> tf.data.Dataset:
    """(images, one-hot labels), prefetched: the last step of every stream."""
    ds = ds.map(lambda x, y: (tf.cast(x, pixels), tf.one_hot(y, num_classes)),
                num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


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
                          budget: MemoryBudget | None = None, *,
                          encoded_bytes: int | None = None) -> str:
    """``--pipeline-cache auto``: 'memory' when ``count`` decoded images of ``image_size``
    px (or, given ``encoded_bytes``, the files' bytes) fit in the budget, else 'file' (under
    the work dir), so that no dataset gets the job OOM-killed by default. Logs the choice
    and why."""
    global _budget
    if budget is None:
        budget = _budget = _budget or MemoryBudget()
    if encoded_bytes is None:
        need = count * (image_size * image_size * 3 + IMAGE_OVERHEAD)
        what = f"{count:,} images at {image_size} px take {need / 2**30:.2f} GiB decoded"
    else:
        need = encoded_bytes + count * IMAGE_OVERHEAD
        what = f"{count:,} images take {need / 2**30:.2f} GiB encoded"
    facts = (f"{what}; {budget.left / 2**30:.2f} GiB left of {budget.fraction:.0%} of "
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
