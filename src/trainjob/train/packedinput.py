"""A packed dataset (``data.packed``) as tf.data streams, for the same ``Streams`` the
classic path builds: nothing is copied whole to local disk.

Training, per epoch: ``data.stream.records`` yields this worker's serialized records in the
epoch's order (a function of the seed and the epoch), starting at the sample a save point
stopped at; tf.data parses them, decodes and augments each image (``inputs.train_image``,
seeded by the sample's id and the epoch, whatever worker reads it) and batches them per
replica. Validation: each worker its share of the validation shards (the figures are summed
across workers); the test split: the chief reads all of it, in the index's order.

A save point records the step; a step is ``worker batch`` samples on every worker, so the
stream of the epoch it stopped in starts at ``step x worker batch``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainjob.config import Config
from trainjob.data import stream
from trainjob.data.stream import Packed
from trainjob.errors import TrainJobError
from trainjob.hooks import read_hooks
from trainjob.train import inputs
from trainjob.train.augment import eval_image, train_image

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE

FEATURES = {"id": tf.io.FixedLenFeature([], tf.int64),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "image": tf.io.FixedLenFeature([], tf.string)}



@dataclass(frozen=True)
class Layout:
    """How this process takes part in an epoch: ``workers`` reading disjoint shards, each
    step ``worker_batch`` samples per worker, in ``local`` per-replica batches."""

    workers: int = 1
    worker: int = 0
    worker_batch: int = 32
    local: int = 1

    @property
    def replica_batch(self) -> int:
        return self.worker_batch // self.local


def train_plan(packed: Packed, seed: int, layout: Layout, shuffle: bool = True) -> stream.Plan:
    return stream.Plan(packed.shards("train"), seed, layout.workers, layout.worker, shuffle)


def samples_per_epoch(plan: stream.Plan, layout: Layout, steps_per_epoch: int | None) -> int:
    """What this worker trains each epoch: ``steps_per_epoch`` full batches where set, else
    its share (``Plan.per_worker``)."""
    if steps_per_epoch:
        return steps_per_epoch * layout.worker_batch
    return plan.per_worker(layout.worker_batch)


def steps_for(count: int, layout: Layout) -> int:
    """Steps per epoch: one worker's last batch may be partial; several train full ones."""
    return math.ceil(count / layout.worker_batch)


def training_stream(packed: Packed, plan: stream.Plan, count: int, cfg: Config,
                    layout: Layout, buffer: int, buffer_dir: Path, num_classes: int,
                    failures: list[TrainJobError]
                    ) -> Callable[[int, int, int], tf.data.Dataset]:
    """``train(first, last, skip)``: batches of epochs [first, last), ``count`` samples of
    ``plan`` each (``train_plan``, ``samples_per_epoch``), less the ``skip`` steps of
    ``first`` a save point records. The reader's typed errors are also added to
    ``failures`` (tf.data hands them on untyped: ``Streams.reported``)."""
    on_sample = sample_logger(layout.worker)

    def generate(epoch: np.int64, start: np.int64) -> Iterator[tuple[list[bytes], np.ndarray]]:
        # With the share shorter than the epoch (--steps-per-epoch), the stream goes round
        # it again: the lap tells a sample's draws apart (augment.train_image's ``draw``).
        share = sum(plan.shards[i].count for i in plan.worker_shards(int(epoch)))
        position = int(start)
        with _kept(failures):
            for chunk in stream.records(plan, packed.store, int(epoch), count, position,
                                        buffer_dir / "train", buffer, on_sample):
                yield chunk, np.full(len(chunk), position // share, dtype=np.int64)
                position += len(chunk)

    def one_epoch(epoch: tf.Tensor, first: int, skip: int) -> tf.data.Dataset:
        start = tf.where(epoch == first, tf.constant(skip * layout.worker_batch, tf.int64),
                         tf.constant(0, tf.int64))
        chunks = tf.data.Dataset.from_generator(
            generate, args=(epoch, start),
            output_signature=(tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int64)))
        image_size, seed, augment = cfg.model.image_size, cfg.split.seed, cfg.optim.augment

        def decode(record: tf.Tensor, draw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            x = tf.io.parse_single_example(record, FEATURES)
            image = train_image(x["image"], x["id"], epoch, seed=seed, image_size=image_size,
                                augment=augment, draw=draw)
            return image, x["label"]

        return (chunks.unbatch().map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
                .batch(layout.replica_batch))

    def train(first: int, last: int, skip: int = 0) -> tf.data.Dataset:
        epochs = tf.data.Dataset.range(first, last)
        batches = epochs.flat_map(lambda e: one_epoch(e, first, skip))
        return inputs.finish(batches, num_classes, pixels=tf.uint8)  # as the classic path

    return train


def evaluation_stream(packed: Packed, split: str, image_size: int, batch: int,
                      num_classes: int, buffer_dir: Path, failures: list[TrainJobError], *,
                      workers: int = 1,
                      worker: int = 0, cache: bool = False,
                      limit: int | None = None) -> tf.data.Dataset:
    """(image, one-hot label) batches of ``split`` in the index's order: this worker's share
    of its shards (every ``workers``-th from ``worker``); ``cache`` keeps the decoded images
    in memory after the first pass."""
    shards = packed.shards(split)[worker::workers]

    def generate() -> Iterator[list[bytes]]:
        with _kept(failures):
            yield from stream.sequential(packed.store, shards, buffer_dir / split,
                                         stream.EVAL_SLOTS)

    def decode(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.io.parse_single_example(record, FEATURES)
        return eval_image(x["image"], image_size), x["label"]

    ds = tf.data.Dataset.from_generator(generate,
                                        output_signature=tf.TensorSpec([None], tf.string))
    ds = ds.unbatch().map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    if limit is not None:
        ds = ds.take(limit)
    if cache:
        ds = ds.cache()
    return inputs.finish(ds.batch(batch), num_classes)


@contextmanager
def _kept(failures: list[TrainJobError]) -> Iterator[None]:
    try:
        yield
    except TrainJobError as exc:
        failures.append(exc)
        raise


def sample_logger(worker: int) -> Callable[[int, int, bytes], None] | None:
    """Test hook ``sample_log``: append "epoch position id" for every sample this worker's
    stream yields (``{worker}`` in the path is the worker's index). The stream runs ahead
    of training by tf.data's prefetch: a test reads it against the save point's step."""
    path = read_hooks().get("sample_log")
    if not path:
        return None
    file = open(str(path).format(worker=worker), "a", buffering=1)  # noqa: SIM115

    def log_sample(epoch: int, position: int, record: bytes) -> None:
        sample = tf.train.Example.FromString(record).features.feature["id"].int64_list.value[0]
        file.write(f"{epoch} {position} {sample}\n")

    return log_sample
