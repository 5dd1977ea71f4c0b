"""Compile, callbacks, fit, evaluate."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainjob.config import Config
from trainjob.datasets import Sample
from trainjob.model import backbone_of, gpus, resolve_jit
from trainjob.phases import HEAD
from trainjob.plots import confusion_matrix
from trainjob.runinfo import top_confusions

log = logging.getLogger(__name__)

RECORDED_CONFUSIONS = 20  # metrics.json's top_confusions; the whole matrix is there too
# The final model's answers have collapsed when its most frequent answer takes more than half
# the test images and more than COLLAPSE_RATIO times the share of the largest true class: a
# model that answers (nearly) one class whatever it sees, while the truth is spread.
COLLAPSE_RATIO = 2
# The training images whose BatchNorm statistics the final model gets (recalibrate_batchnorm):
# population estimates settle within a few thousand images (pycls averages 8,192, Detectron2's
# PreciseBN 200 batches), and 4,096 at 224 px are ~128 forward passes of 32, seconds on a GPU.
PRECISE_BN_IMAGES = 4096


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


def batchnorm_layers(layer: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer in ``layer``, nested models included, in order."""
    found = []
    for sub in getattr(layer, "layers", []):
        if isinstance(sub, keras.layers.BatchNormalization):
            found.append(sub)
        else:
            found += batchnorm_layers(sub)
    return found


def recalibrate_batchnorm(model: keras.Model, dataset: tf.data.Dataset, max_batches: int) -> int:
    """Make each trained BatchNorm layer's moving mean and variance the exact average of
    its batch statistics over up to ``max_batches`` batches of ``dataset`` (images, or
    (images, labels)), with the weights as they are ("precise BN"); returns the batches used.

    The moving averages (momentum 0.99) lag behind weights that keep moving, and inference
    uses them. Frozen layers (trainable False: inference mode in Keras 3) are left alone. A
    last batch smaller than the first is left out, unless it is the only one: its
    statistics are not those training normalized with. The passes run on a copy built
    outside any strategy (several workers: only the chief evaluates, so nothing here may
    be a collective), and the averages are assigned to ``model``'s own variables, in
    float32 whatever the precision policy. Call outside any strategy's scope."""
    if tf.distribute.has_strategy():
        raise RuntimeError("recalibrate_batchnorm: call it outside the strategy's scope")
    targets = [layer for layer in batchnorm_layers(model) if layer.trainable]
    if not targets or max_batches < 1:
        return 0
    started = time.monotonic()
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    layers = [layer for layer in batchnorm_layers(copy) if layer.trainable]
    if [x.moving_mean.shape for x in layers] != [x.moving_mean.shape for x in targets]:
        raise RuntimeError("recalibrate_batchnorm: the copy's BatchNorm layers differ")
    for layer in layers:
        layer.momentum = 0.0  # each training-mode call leaves that batch's own statistics

    @tf.function(reduce_retracing=True)
    def batch_statistics(images: tf.Tensor) -> list[tf.Tensor]:
        copy(images, training=True)
        return [tf.identity(v.value) for layer in layers
                for v in (layer.moving_mean, layer.moving_variance)]

    sums, batches, images, first = None, 0, 0, None
    for element in dataset.take(max_batches):
        x = element[0] if isinstance(element, (tuple, list)) else element
        size = int(x.shape[0])
        first = first or size
        if batches and size < first:
            break  # the remainder batch
        stats = [np.asarray(s, dtype=np.float64) for s in batch_statistics(x)]
        sums = stats if sums is None else [a + b for a, b in zip(sums, stats)]
        batches, images = batches + 1, images + size
    if not batches:
        log.warning("BatchNorm statistics not recomputed: no training images")
        return 0
    pairs = [v for layer in targets for v in (layer.moving_mean, layer.moving_variance)]
    for variable, total in zip(pairs, sums):
        variable.assign((total / batches).astype(np.float32))
    log.info("recomputed the BatchNorm statistics of %d layers over %d batches (%d training "
             "images) in %.1fs", len(targets), batches, images, time.monotonic() - started)
    return batches


def class_weights(train: list[Sample], num_classes: int, mode: str) -> dict[int, float] | None:
    if mode != "balanced":
        return None
    counts = Counter(s.label for s in train)
    total = len(train)
    return {k: total / (num_classes * counts[k]) if counts[k] else 0.0 for k in range(num_classes)}


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


def evaluate(model: keras.Model, test_ds: tf.data.Dataset, test: list[Sample],
             classes: list[str], predict=None) -> dict:
    """Loss, accuracy, top-5, per-class accuracy and their mean (the Caltech101 figure),
    the confusion matrix (rows: true class) and its most frequent off-diagonal cells.

    One predict pass gives all of them; model.evaluate would trace and run a second pass.
    """
    if not test:
        log.warning("the test split is empty: metrics.json holds no test figures")
        return {"test_images": 0}
    probs = predict(model, test_ds) if predict else model.predict(test_ds, verbose=0)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.array([s.label for s in test])
    predicted = np.argmax(probs, axis=1)
    k = min(5, len(classes))
    top_k = np.argsort(-probs, axis=1)[:, :k]
    per_class = {name: float(np.mean(predicted[labels == i] == i))
                 for i, name in enumerate(classes) if np.any(labels == i)}
    matrix = confusion_matrix(labels, predicted, len(classes)).tolist()
    names = {str(i): name for i, name in enumerate(classes)}
    answers = answer_spread(labels, predicted, classes)
    return {
        "test_images": len(test),
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1)))),
        "accuracy": float(np.mean(predicted == labels)),
        "top5_accuracy": float(np.mean(np.any(top_k == labels[:, None], axis=1))),
        "per_class_accuracy": per_class,
        "mean_per_class_accuracy": float(np.mean(list(per_class.values()))),
        "confusion_matrix": matrix,
        "top_confusions": top_confusions({"confusion_matrix": matrix}, names,
                                         RECORDED_CONFUSIONS),
        "answers": answers,
        "warnings": [collapse_warning(answers)] if answers["collapsed"] else [],
    }


def answer_spread(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """How the test answers spread over the classes, against the truth; ``collapsed`` by the
    rule above (COLLAPSE_RATIO)."""
    answered = np.bincount(predicted, minlength=len(classes))
    truth = np.bincount(labels, minlength=len(classes))
    top, n = int(np.argmax(answered)), len(labels)
    # In counts, not shares: 12 of 18 against 2 x 6 is not a collapse, whatever the rounding.
    collapsed = bool(2 * answered[top] > n and answered[top] > COLLAPSE_RATIO * truth.max())
    return {"top_class": classes[top], "top_count": int(answered[top]),
            "top_share": float(answered[top] / n), "largest_true_share": float(truth.max() / n),
            "classes_answered": int(np.count_nonzero(answered)), "collapsed": collapsed}


def collapse_warning(answers: dict) -> str:
    """The one line that says the final model answers (nearly) one class; logged, and kept
    in metrics.json's ``warnings``."""
    message = (f"the final model's test answers collapsed: {answers['top_class']!r} for "
               f"{answers['top_share']:.0%} of the test images, where the largest class is "
               f"{answers['largest_true_share']:.0%} of them: it does not tell the classes "
               "apart in inference mode (see README, 'Collapsed answers')")
    log.warning("%s", message)
    return message
