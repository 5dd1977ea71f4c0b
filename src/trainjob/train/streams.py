"""The data a run trains and evaluates on, as tf.data streams batched for its strategy:
from the files of a scanned dataset (``inputs``) or from a packed dataset's shards
(``packedinput``). ``Session`` builds one ``Streams`` and never asks which.

Several workers: each trains its part of every epoch in per-replica batches, and every step
is a full global batch, so that all workers take as many steps. Files: element i of the
epoch's order goes to worker i % workers (the data wraps). Packed: each worker streams its
own shards (``data.stream.Plan``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf

from trainjob.config import Config
from trainjob.data import stream
from trainjob.data.catalog import Dataset
from trainjob.errors import ConfigError, TrainJobError
from trainjob.run.cluster import Cluster
from trainjob.train import inputs, packedinput

log = logging.getLogger(__name__)


@dataclass
class Streams:
    """What ``Session`` reads. ``train(first, last, skip)``: the batches of epochs
    [first, last) less the ``skip`` steps of ``first`` a save point records;
    ``recalibration(batch)`` and ``test(batch)``: (images, one-hot labels) batches of the
    training images without augmentation (BatchNorm's statistics) and of the test split."""

    train: Callable[[int, int, int], tf.data.Dataset]
    recalibration: Callable[[int], tf.data.Dataset]
    val: tf.data.Dataset | None
    test: Callable[[int], tf.data.Dataset]
    steps: int  # global batches per epoch
    failures: list[TrainJobError] = field(default_factory=list)  # the readers' own errors

    @contextmanager
    def reported(self) -> Iterator[None]:
        """A reader's typed error (a damaged shard: exit 4) reaches Python through tf.data
        as TensorFlow's untyped one, its message lost: raise the reader's instead."""
        try:
            yield
        except Exception as exc:
            if self.failures and not isinstance(exc, TrainJobError):
                raise self.failures[0] from exc
            raise


def build(cfg: Config, data: Dataset, replicas: int, group: Cluster | None) -> Streams:
    return (_packed if data.packed else _files)(cfg, data, replicas, group)


def check_resume(data: Dataset, state: dict | None, group: Cluster | None) -> None:
    """A packed epoch stopped mid-way continues exactly only on as many workers as it
    started with (each reads its own shards): exit 2 otherwise, naming both."""
    workers = group.size if group else 1
    if not data.packed or not state or not state.get("step"):
        return
    started = int(state.get("workers", 1))
    if started != workers:
        raise ConfigError(
            f"cannot resume: the save point is in epoch {state['epoch']} after batch "
            f"{state['step']} of {_workers(started)}, each streaming its own shards, and "
            f"{_workers(workers)} cannot continue that epoch exactly: run it on "
            f"{_workers(started)} until the epoch ends, or pass --overwrite to start afresh")


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _files(cfg: Config, data: Dataset, replicas: int, group: Cluster | None) -> Streams:
    splits, num_classes, work = data.splits, len(data.classes), tfcache(cfg)
    steps = inputs.steps_for(len(splits.train), cfg.optim.batch_size, cfg.optim.steps_per_epoch)
    train_files = inputs.encoded(splits.train, cfg.data.pipeline_cache, work, "train")
    local = replicas // group.size if group else 1

    def train(first: int, last: int, skip: int = 0) -> tf.data.Dataset:
        return inputs.training_stream(
            train_files, len(splits.train), num_classes, image_size=cfg.model.image_size,
            batch_size=cfg.optim.batch_size // (replicas if group else 1),
            steps=steps * local, repeat=group is not None or cfg.optim.steps_per_epoch
            is not None, shuffle=cfg.optim.shuffle, augment=cfg.optim.augment,
            seed=cfg.split.seed, first_epoch=first, epochs=last, skip_batches=skip * local,
            shard=(group.index, group.size) if group else (0, 1))

    def evaluation(samples: list, name: str, cache: str) -> Callable[[int], tf.data.Dataset]:
        # BatchNorm's recalibration and the test split are read once: no cache.
        return lambda batch: inputs.evaluation_stream(
            inputs.decoded(samples, cfg.model.image_size, cache, work, name), num_classes, batch)

    val = None
    if splits.val:
        val_base = inputs.decoded(splits.val, cfg.model.image_size, cfg.data.pipeline_cache,
                                  work, "val")
        if group:
            val_base = val_base.shard(group.size, group.index)
        val = inputs.evaluation_stream(val_base, num_classes, cfg.optim.batch_size)
    return Streams(train, evaluation(splits.train, "train", "none"), val,
                   evaluation(splits.test, "test", "none"), steps)


def _packed(cfg: Config, data: Dataset, replicas: int, group: Cluster | None) -> Streams:
    packed, num_classes = data.packed, len(data.classes)
    workers, worker = (group.size, group.index) if group else (1, 0)
    # One worker hands Keras the global batch (it splits it among local replicas); several
    # hand their step loop per-replica batches, ``local`` of them a step.
    layout = packedinput.Layout(workers, worker, cfg.optim.batch_size // workers,
                                replicas // workers if group else 1)
    buffer = stream.buffer_shards(cfg.data.stream_buffer, packed.index.shards)
    folder = Path(cfg.runtime.work_dir) / "stream"
    stream.clear_buffer(folder)  # what a killed job of this work dir left
    plan = packedinput.train_plan(packed, cfg.split.seed, layout, cfg.optim.shuffle)
    count = packedinput.samples_per_epoch(plan, layout, cfg.optim.steps_per_epoch)
    steps = packedinput.steps_for(count, layout)
    log.info("streaming %s: %d shards of training data for %d worker(s), %d samples and %d "
             "steps an epoch on each, through a buffer of %d shards under %s",
             packed.store.uri, len(plan.shards), workers, count, steps, buffer, folder)
    failures: list[TrainJobError] = []
    train = packedinput.training_stream(packed, plan, count, cfg, layout,
                                        buffer - stream.EVAL_SLOTS, folder, num_classes,
                                        failures)
    image_size = cfg.model.image_size

    def evaluation(split: str, parts: int = 1, part: int = 0, cache: bool = False
                   ) -> Callable[[int], tf.data.Dataset]:
        return lambda batch: packedinput.evaluation_stream(
            packed, split, image_size, batch, num_classes, folder, failures, workers=parts,
            worker=part, cache=cache)

    val = None
    if packed.index.counts["val"]:
        fits = cfg.data.pipeline_cache == "memory" or (
            cfg.data.pipeline_cache == "auto" and inputs.choose_pipeline_cache(
                packed.index.counts["val"] // workers, image_size, "val") == "memory")
        val = evaluation("val", workers, worker, cache=fits)(cfg.optim.batch_size)
    return Streams(train, evaluation("train"), val, evaluation("test"), steps, failures)


def tfcache(cfg: Config) -> Path:
    return Path(cfg.runtime.work_dir) / "tfcache"
