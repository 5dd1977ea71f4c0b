"""The final model's evaluation: BatchNorm statistics recomputed over the training split,
the test metrics, per-class accuracy, the confusion matrix, and whether the answers
collapsed."""

from __future__ import annotations

import logging
import time

import keras
import numpy as np
import tensorflow as tf

from trainjob.inspect.runinfo import top_confusions
from trainjob.train.plots import confusion_matrix

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


def predict(model: keras.Model, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and true labels of every (images, one-hot labels) batch of
    ``ds``, in one pass, on this process alone (several workers: the chief evaluates the
    test split after the others are done, so nothing here may be a collective)."""
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    probs, labels = [], []
    for x, y in ds:
        probs.append(np.asarray(call(x), dtype=np.float64))
        labels.append(np.argmax(np.asarray(y), axis=1))
    if not probs:
        return np.zeros((0, int(model.output_shape[-1]))), np.zeros(0, dtype=np.int64)
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model: keras.Model, test_ds: tf.data.Dataset, classes: list[str]) -> dict:
    """Loss, accuracy, top-5, per-class accuracy and their mean (the Caltech101 figure),
    the confusion matrix (rows: true class) and its most frequent off-diagonal cells.

    One pass over ``test_ds`` ((images, one-hot labels) batches) gives all of them: the
    labels come with the images, whether the split is a list of files or streamed shards.
    """
    probs, labels = predict(model, test_ds)
    if not len(labels):
        log.warning("the test split is empty: metrics.json holds no test figures")
        return {"test_images": 0}
    predicted = np.argmax(probs, axis=1)
    k = min(5, len(classes))
    top_k = np.argsort(-probs, axis=1)[:, :k]
    per_class = {name: float(np.mean(predicted[labels == i] == i))
                 for i, name in enumerate(classes) if np.any(labels == i)}
    matrix = confusion_matrix(labels, predicted, len(classes)).tolist()
    names = {str(i): name for i, name in enumerate(classes)}
    answers = answer_spread(labels, predicted, classes)
    return {
        "test_images": len(labels),
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
