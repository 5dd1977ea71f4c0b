"""MultiWorkerMirroredStrategy for several workers, formed within --cluster-timeout from the
save point the chief names, with every collective operation bounded by --collective-timeout
and every worker's start checked before the first step.

TensorFlow's constructor waits for every peer without a limit, and a collective whose peer
hung waits without one too (and the Python signal handler cannot run meanwhile). Both are
bounded here: a barrier of our own before the constructor, and TensorFlow's public
CommunicationOptions time-out on every collective.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from trainjob.config import Config
from trainjob.errors import ClusterError, first_line
from trainjob.hooks import injected_error
from trainjob.run import savepoints, startpoint
from trainjob.run.cluster import Cluster, wait_for_peers
from trainjob.run.folder import RunFolder
from trainjob.run.stop import StopSignal
from trainjob.train.model import gpus
from trainjob.train.trainer import weights_digest

log = logging.getLogger(__name__)

# What a collective raises once a peer died, hung past the time-out, or aborted.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.CancelledError, tf.errors.AbortedError, tf.errors.InternalError)


def join(cfg: Config, cluster: Cluster, run_dir: RunFolder, state: dict | None,
         stop: StopSignal, fingerprint: dict) -> tuple[tf.distribute.Strategy, dict | None, int]:
    """The strategy, the save point this worker starts from, and the run's replica count.

    A run whose training is finished needs no cluster: the chief evaluates and publishes
    alone, on the default strategy (its peers left once that was stored: startpoint.py).
    Otherwise the chief names its save point at the start-up barrier, and each other worker
    fetches exactly that one before the cluster forms."""
    if cluster.is_chief and state and state.get("finished_training"):
        log.info("training is finished: worker 0 evaluates and publishes alone, without the "
                 "cluster")
        # The run's replicas (for config.json): the pods of a Job are alike.
        return tf.distribute.get_strategy(), state, cluster.size * max(1, len(gpus()))
    chosen = {"state": state}

    def take(announced: dict, deadline: float) -> None:
        chosen["state"] = startpoint.fetch(announced, run_dir, deadline, cluster.index)

    strategy = make_strategy(
        cluster, cluster_timeout=cfg.cluster.cluster_timeout,
        collective_timeout=cfg.cluster.collective_timeout,
        announce=startpoint.choice(state, run_dir) if cluster.is_chief else None,
        on_announce=None if cluster.is_chief else take)
    # TensorFlow's coordination service installs a SIGTERM handler of its own (its
    # preemption notifier): take the signal back, so that the group stops our way.
    stop.install()
    stop.collective = True  # a signal stops the group at one agreed step
    if chosen["state"] and not cluster.is_chief:  # the chief checked its own before
        savepoints.check_compatible(chosen["state"], fingerprint)
    return strategy, chosen["state"], strategy.num_replicas_in_sync


def check_start(strategy: tf.distribute.Strategy, cluster: Cluster, model, state: dict | None,
                collective_timeout: float) -> None:
    """Before the first step: every worker restored the save point the chief named and holds
    the same weights (and optimizer state), or ClusterError (exit 4) naming both starts."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return  # the chief alone, after training
    digest = weights_digest([*model.weights, *model.optimizer.variables])
    shared = shared_sum(strategy, startpoint.start_vector(state, digest, cluster.index,
                                                          cluster.size),
                        cluster=cluster, collective_timeout=collective_timeout, point="start")
    if problem := startpoint.disagreement(shared, cluster.size):
        raise ClusterError(f"worker {cluster.index}: the workers do not start alike: "
                           f"{problem}; restart the group (each worker then loads the save "
                           "point the chief names)")
    log.info("worker %d: all %d workers start from %s", cluster.index, cluster.size,
             startpoint.named_start(shared, cluster.size))


def make_strategy(cluster: Cluster, *, cluster_timeout: float, collective_timeout: float,
                  announce: dict | None = None,
                  on_announce: Callable[[dict, float], None] | None = None
                  ) -> tf.distribute.MultiWorkerMirroredStrategy:
    """Join the cluster, or raise ClusterError (exit 4) naming the workers that never came.
    ``announce`` and ``on_announce``: what the barrier carries (cluster.wait_for_peers)."""
    os.environ["TF_CONFIG"] = cluster.tf_config
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    # TensorFlow's constructor would wait for missing peers forever, deaf to signals: the
    # workers meet first in a barrier that has a time-out (cluster.wait_for_peers).
    log.info("worker %d of %d (%s): waiting up to %.0fs for %s", cluster.index, cluster.size,
             cluster.source, cluster_timeout, ", ".join(a for _, a in cluster.peers()))
    wait_for_peers(cluster, cluster_timeout, announce=announce, on_announce=on_announce)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        raise ClusterError(f"worker {cluster.index} ({cluster.workers[cluster.index]}) could "
                           f"not join the cluster: {first_line(exc)[:300]}") from exc
    log.info("cluster formed: %d workers, %d replicas", cluster.size,
             strategy.num_replicas_in_sync)
    return strategy


_SUMS: dict[int, tf.types.experimental.GenericFunction] = {}


def all_sum(strategy: tf.distribute.Strategy, values: np.ndarray | list[float]) -> np.ndarray:
    """Sum a small vector across workers (every worker must call this at the same point).
    Traced once per strategy: run eagerly, each call costs seconds of set-up."""
    if id(strategy) not in _SUMS:
        local = float(len(strategy.extended.worker_devices))

        @tf.function
        def reduce(value: tf.Tensor) -> tf.Tensor:
            per_replica = strategy.run(lambda: tf.identity(value) / local)
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        _SUMS[id(strategy)] = reduce
    return _SUMS[id(strategy)](tf.constant(np.asarray(values, np.float64))).numpy()


def shared_sum(strategy: tf.distribute.Strategy, values: np.ndarray | list[float], *,
               cluster: Cluster, collective_timeout: float, point: str) -> np.ndarray:
    """``all_sum`` at a named point of the run; a peer's failure there is ClusterError."""
    try:
        inject(point)
        return all_sum(strategy, values)
    except PEER_ERRORS as exc:
        raise peer_failure(exc, cluster, collective_timeout) from exc


def inject(point: str) -> None:
    """Test hook: raise the error a test asked for at this collective (hooks.injected_error)."""
    name = injected_error(point)
    if name is None:
        return
    message = f"test hook: {name} at the {point} collective"
    if name == "MemoryError":
        raise MemoryError(message)
    raise getattr(tf.errors, name)(None, None, message)


def peer_failure(exc: BaseException, cluster: Cluster, collective_timeout: float) -> ClusterError:
    """The one line for a collective that failed because a peer did."""
    return ClusterError(
        f"worker {cluster.index}: a peer worker died or stopped responding (collective "
        f"time-out {collective_timeout:g}s): {type(exc).__name__}: {first_line(exc)[:200]}; the "
        "group must restart, and resumes from the last save point")
