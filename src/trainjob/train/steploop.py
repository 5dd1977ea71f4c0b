"""The training loop for several workers: Keras' model, optimizer and loss in a
``tf.function`` step under ``strategy.run``, and Keras' own callbacks driven through
``keras.callbacks.CallbackList``.

Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so this
is what ``fit`` does per step and per epoch, and no more: every callback (checkpoints,
EarlyStopping, ReduceLROnPlateau, CSVLogger, RunKeeper) is the same object with the same
logic as on one worker. The epoch figures are sums all-reduced across workers, so every
worker's callbacks see the same numbers and take the same decisions; a stop asked of any
worker is one more all-reduced number, so the whole group stops after the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from trainjob.config import Config
from trainjob.run.cluster import Cluster
from trainjob.run.stop import StopSignal
from trainjob.train import collective

log = logging.getLogger(__name__)

LOSS, CORRECT, TOP_K, COUNT, STOP = range(5)  # the all-reduced vector of a step


def fit(model: keras.Model, train_ds: tf.data.Dataset, *, strategy: tf.distribute.Strategy,
        cluster: Cluster, stop: StopSignal, val_ds: tf.data.Dataset | None, cfg: Config,
        steps: int, initial_epoch: int, epochs: int, callbacks: list,
        weights: dict[int, float] | None,
        traced: Callable[[Callable], Callable] = lambda step: step) -> None:
    """``model.fit`` for epochs [initial_epoch, epochs) of ``steps`` steps each.

    ``train_ds`` is this worker's shard, batched per replica (train.streams); ``traced``
    wraps the replica step's Python (callbacks.StartClock)."""
    num_classes = int(model.output_shape[-1])
    loss_fn = keras.losses.CategoricalCrossentropy(
        label_smoothing=cfg.optim.label_smoothing, reduction=None)
    table = tf.constant([(weights or {}).get(i, 1.0) for i in range(num_classes)], tf.float32)
    k = min(5, num_classes)
    global_batch = float(cfg.optim.batch_size)
    iterator = iter(strategy.distribute_datasets_from_function(lambda _context: train_ds))

    def replica_step(x: tf.Tensor, y: tf.Tensor, flag: tf.Tensor) -> tf.Tensor:
        sample_weights = tf.gather(table, tf.argmax(y, axis=1))
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            per_sample = loss_fn(y, probs) * sample_weights
            # Summed over the global batch: the optimizer sums gradients across replicas.
            loss = tf.reduce_sum(per_sample) / global_batch
            scaled = model.optimizer.scale_loss(loss)  # mixed precision's loss scale
        grads = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return tf.concat([_sums(y, probs, per_sample, k), [flag]], axis=0)

    step = traced(replica_step)

    @tf.function
    def train_step(flag: tf.Tensor) -> tf.Tensor:
        x, y = next(iterator)
        per_replica = strategy.run(step, args=(x, y, flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    evaluate = _validator(model, strategy, val_ds, loss_fn, k, cluster,
                          cfg.cluster.collective_timeout) if val_ds is not None else None
    callback_list = keras.callbacks.CallbackList(callbacks, model=model, add_history=False,
                                                 add_progbar=False)
    callback_list.set_params({"epochs": epochs, "steps": steps, "verbose": 0})
    model.stop_training = False
    logs: dict[str, float] = {}
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        started, totals = time.monotonic(), np.zeros(4)
        callback_list.on_epoch_begin(epoch)
        for batch in range(steps):
            callback_list.on_train_batch_begin(batch)
            try:
                collective.inject("step")
                sums = train_step(tf.constant(1.0 if stop.signalled else 0.0)).numpy()
            except collective.PEER_ERRORS as exc:
                raise collective.peer_failure(exc, cluster, cfg.cluster.collective_timeout) \
                    from exc
            if sums[STOP] > 0:  # some worker was signalled before this step: all stop now
                stop.agree(f"worker {cluster.index}: the group agreed to stop" +
                           ("" if stop.signalled else " (a peer worker was signalled)"))
            totals += sums[:STOP]
            logs = _logs(totals)
            callback_list.on_train_batch_end(batch, logs)  # RunKeeper stops here on a signal
            if model.stop_training:
                break
        if evaluate and (epoch + 1) % cfg.optim.validation_freq == 0:
            logs.update({f"val_{name}": value for name, value in evaluate().items()})
        callback_list.on_epoch_end(epoch, logs)
        log.info("epoch %d/%d (%.0fs): %s", epoch + 1, epochs, time.monotonic() - started,
                 " - ".join(f"{name}: {value:.4f}" for name, value in sorted(logs.items())))
        if model.stop_training:
            break
    callback_list.on_train_end(logs)


def _sums(y: tf.Tensor, probs: tf.Tensor, per_sample: tf.Tensor, k: int) -> tf.Tensor:
    """Loss sum, correct top-1, correct top-k and count: what fit's metrics average."""
    labels = tf.argmax(y, axis=1)
    correct = tf.cast(tf.equal(tf.argmax(probs, axis=1), labels), tf.float32)
    in_top_k = tf.cast(tf.math.in_top_k(tf.cast(labels, tf.int32), tf.cast(probs, tf.float32),
                                        k), tf.float32)
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.stack([tf.reduce_sum(tf.cast(per_sample, tf.float32)), tf.reduce_sum(correct),
                     tf.reduce_sum(in_top_k), count])


def _logs(totals: np.ndarray) -> dict[str, float]:
    n = max(float(totals[COUNT]), 1.0)
    return {"loss": float(totals[LOSS] / n), "accuracy": float(totals[CORRECT] / n),
            "top5": float(totals[TOP_K] / n)}


def _validator(model: keras.Model, strategy: tf.distribute.Strategy, val_ds: tf.data.Dataset,
               loss_fn: keras.losses.Loss, k: int, cluster: Cluster, collective_timeout: float):
    """Each worker evaluates its shard locally; one all-reduce makes the figures the group's
    (a peer that fails meanwhile is exit 4, as in a step)."""

    @tf.function
    def batch_sums(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        probs = model(x, training=False)
        return _sums(y, probs, loss_fn(y, probs), k)

    def evaluate() -> dict[str, float]:
        totals = np.zeros(4)
        for x, y in val_ds:
            totals += batch_sums(x, y).numpy()
        return _logs(collective.shared_sum(strategy, totals, cluster=cluster,
                                           collective_timeout=collective_timeout,
                                           point="validation"))

    return evaluate
