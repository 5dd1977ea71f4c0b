"""Compile, callbacks, fit, evaluate."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainjob.config import Config
from trainjob.run.phases import HEAD
from trainjob.train.model import backbone_of, gpus, resolve_jit

log = logging.getLogger(__name__)


def make_strategy(devices: list[str] | None = None) -> tf.distribute.Strategy:
    """MirroredStrategy over the GPUs when there is more than one; else the default.

    ``devices`` defaults to every visible GPU. (MultiWorkerMirroredStrategy is not offered:
    Keras 3's fit fails under it, keras-team/keras#20585.)"""
    if devices is None:
        devices = [f"/gpu:{i}" for i in range(len(gpus()))]
    if len(devices) > 1:
        strategy = tf.distribute.MirroredStrategy(devices)
        log.info("MirroredStrategy over %d devices", strategy.num_replicas_in_sync)
        return strategy
    return tf.distribute.get_strategy()


def scale_learning_rates(cfg: Config, replicas: int) -> Config:
    """--lr-scaling linear: the rates times the replicas (the global batch grew with them)."""
    o = cfg.optim
    if o.lr_scaling != "linear" or replicas == 1:
        return cfg
    fine_tune = o.fine_tune_learning_rate * replicas if o.fine_tune_learning_rate else None
    log.info("--lr-scaling linear: learning rate %g x %d replicas", o.learning_rate, replicas)
    return dataclasses.replace(cfg, optim=dataclasses.replace(
        o, learning_rate=o.learning_rate * replicas, fine_tune_learning_rate=fine_tune))


def weights_digest(variables: list) -> str:
    """sha256 over the variables' values, in order."""
    h = hashlib.sha256()
    for v in variables:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v)).tobytes())
    return h.hexdigest()


def record_weights(model: keras.Model, out: Path, **fields: object) -> None:
    """Digests of this worker's weights (a private file): the trainable ones must agree
    across workers; BatchNorm's moving statistics are per worker."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**fields,
                               "trainable_sha256": weights_digest(model.trainable_weights),
                               "non_trainable_sha256": weights_digest(
                                   model.non_trainable_weights)}))


def compile_model(model: keras.Model, cfg: Config, num_classes: int,
                  optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """Compile with a new optimizer at --learning-rate, or with ``optimizer`` kept."""
    o = cfg.optim
    if optimizer is None and o.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(o.learning_rate, momentum=o.momentum)
    elif optimizer is None:
        optimizer = keras.optimizers.Adam(o.learning_rate)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=o.label_smoothing),
        metrics=["accuracy",
                 keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5")],
        jit_compile=resolve_jit(cfg.model.jit_compile),
    )
    build_metrics(model, num_classes)


def build_metrics(model: keras.Model, num_classes: int) -> None:
    """Create the compiled metrics' variables now, not in the first traced step.

    Without a strategy scope of its own, Keras builds them while tracing the first train
    step; creating variables there makes TensorFlow trace the whole step a second time
    (measured: ResNet50's first fit 77 s against 44 s here). Callbacks in mode "auto" also
    read each metric's direction from them. Call in the strategy's scope."""
    sample = keras.ops.zeros((1, num_classes))
    for metric in model.metrics:
        if hasattr(metric, "metrics") and not metric.built:  # CompileMetrics
            metric.build(sample, sample)


def enter_phase(model: keras.Model, cfg: Config, num_classes: int, phase: str,
                rate: float | None = None) -> None:
    """Freeze (HEAD) or unfreeze the backbone and recompile, keeping the optimizer object.

    The optimizer is built over every variable either phase trains, before anything is
    frozen: its step count, the head's moments and the learning-rate variable carry over
    the boundary, and a save point has the same layout in both phases. Frozen, the
    backbone's BatchNorm layers run in inference mode (Keras 3: trainable=False does it).
    Call inside the strategy's scope."""
    backbone = backbone_of(model)
    if not model.optimizer.built:
        backbone.trainable = True
        model.optimizer.build(model.trainable_variables)
    trainable = phase != HEAD
    if backbone.trainable != trainable:
        backbone.trainable = trainable
        compile_model(model, cfg, num_classes, optimizer=model.optimizer)
    if rate is not None:
        model.optimizer.learning_rate = rate
    log.info("phase %s: backbone %s, %d trainable variables, learning rate %.4g", phase,
             "trainable" if trainable else "frozen", len(model.trainable_variables),
             learning_rate(model))


def learning_rate(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def class_weights(counts: list[int], mode: str) -> dict[int, float] | None:
    """``--class-weight balanced``: each class weighted by total / (classes x its count),
    from the training images per class (``counts``, in class order)."""
    if mode != "balanced":
        return None
    total, num_classes = sum(counts), len(counts)
    return {k: total / (num_classes * n) if n else 0.0 for k, n in enumerate(counts)}


def fit_verbosity(mode: str) -> int:
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "line"
    return 1 if mode == "bar" else 2


def fit(model: keras.Model, train_ds: tf.data.Dataset, *, val_ds: tf.data.Dataset | None,
        cfg: Config, steps: int, initial_epoch: int, epochs: int, callbacks: list,
        weights: dict[int, float] | None) -> None:
    model._initial_epoch = None  # left set by restores; it would override initial_epoch
    model.fit(
        train_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=val_ds,
        validation_freq=cfg.optim.validation_freq,
        class_weight=weights,
        shuffle=False,  # the pipeline shuffles, seeded per epoch (inputs.training_stream)
        callbacks=callbacks,
        verbose=fit_verbosity(cfg.runtime.verbose_fit),
    )
