"""``run(cfg)``: fetch data, build the pipeline and model, train, evaluate, publish.

Read top to bottom; each step is one call into the module that owns it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from trainjob import termination
from trainjob.config import Config
from trainjob.data import source
from trainjob.data.catalog import Catalog, Splits, split
from trainjob.errors import (
    ConfigError,
    LostOwnership,
    Preempted,
    StorageError,
    TrainJobError,
    as_job_error,
)
from trainjob.hooks import hold
from trainjob.run import cluster as clusters
from trainjob.run import configfile, phases, savepoints, startpoint
from trainjob.run.cluster import Cluster
from trainjob.run.folder import (
    BACKUP,
    CLASSES,
    LAST,
    MANIFEST,
    METRICS,
    MODEL,
    PLOT,
    RUN_ENTRIES,
    STATUS,
    RunFolder,
    read_json,
)
from trainjob.run.lock import RunLock
from trainjob.run.state import RunState
from trainjob.run.stop import StopSignal
from trainjob.store import base, hostcache, uri
from trainjob.store.s3 import S3Store
from trainjob.train import weights
from trainjob.train.plots import plot_history

log = logging.getLogger(__name__)

FAILURE_FLUSH_SECONDS = 60.0
SHUTDOWN_RESERVE_SECONDS = 3.0  # of the grace period: closing the uploader, the lock
STATUS_RESERVE_SECONDS = 2.0  # of the grace period: marking the stored status, if need be


def run(cfg: Config) -> None:
    stop = StopSignal(cfg.runtime.grace_seconds)
    stop.on_exit = termination.write  # the watchdog's exits are told like any other
    stop.install()
    group = clusters.resolve(cfg.cluster)  # None: this job trains alone
    if group and cfg.optim.batch_size % group.size:
        raise ConfigError(f"--batch-size {cfg.optim.batch_size} is the global batch: it must "
                          f"divide evenly among the {group.size} workers")
    store = uri.open_store(cfg.output.output, cfg.runtime.threads)
    if isinstance(store, S3Store):
        store.check_bucket()  # fail in seconds, not after the download
    if _finished(store, cfg):
        return
    if group and not group.is_chief:
        # Another worker holds the lock and writes the run folder; this one trains in a
        # private folder, from the save point the chief names at start-up (collective.join).
        if not cfg.output.overwrite and startpoint.finished(store, group.index):
            return
        with (hostcache.session(),
              RunFolder(Path(cfg.runtime.work_dir) / f"worker-{group.index}", store,
                        read_only=True) as run_dir):
            _clear_local(run_dir.local)
            try:
                _train(cfg, run_dir, None, None, stop, {}, group)
            except Exception as exc:  # out of memory is exit 5 here too, as on the chief
                if (error := as_job_error(exc, f"worker {group.index}: ", peers=True)) is exc:
                    raise
                raise error from exc
        return
    lock = RunLock(store)
    lock.acquire(force=cfg.output.force, timeout=cfg.output.lock_timeout)
    try:
        if _finished(store, cfg):  # it finished while we waited for the lock
            return
        # The cache folders this run reads stay locked (shared) until it ends: no other job
        # on this host prunes or rewrites them meanwhile.
        with (hostcache.session(),
              RunFolder(_local_run_dir(cfg), store, sync=cfg.output.sync,
                        lease=lock) as run_dir):
            # What the signal watchdog does if training does not stop within the grace period.
            stop.emergency = functools.partial(_stop_now, run_dir, lock)
            _run_locked(cfg, run_dir, lock, stop, group)
    finally:
        _release(lock, stop, cfg.runtime.grace_seconds)


def _release(lock: RunLock, stop: StopSignal, grace: float) -> None:
    """Release the lock; after a signal, only within what is left of the grace period (a
    lock left behind goes stale, and the Job's next pod takes it over by owner id)."""
    if not (stop.requested or stop.signalled):
        lock.release()
        return
    if not _within(stop.remaining(grace) - 0.5, lock.release, "trainjob-unlock"):
        log.warning("grace period over: the run lock is left to go stale")


def _stop_now(run_dir: RunFolder, lock: RunLock, reason: str) -> None:
    """The signal watchdog's stop, for a main thread still inside a step or a collective
    when the grace period is nearly over: the status the output holds says preempted (it
    describes the newest save point wholly stored), and the lock goes back."""
    if run_dir.remote:
        _within(STATUS_RESERVE_SECONDS, functools.partial(
            run_dir.mark_stored_status, "preempted", error=reason), "trainjob-status")
    else:
        try:
            run_dir.check()
            run_dir.set_status("preempted", error=reason)
        except TrainJobError as exc:
            log.warning("could not mark the run preempted: %s", exc)
    _within(1.0, lock.release, "trainjob-unlock")


def _within(seconds: float, action: Callable[[], object], name: str) -> bool:
    """Run ``action`` in a daemon thread and wait at most ``seconds`` for it (a store that
    stopped answering cannot hold the exit); returns whether it finished."""
    worker = threading.Thread(target=action, name=name, daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    return not worker.is_alive()


def _finished(store: base.Store, cfg: Config) -> bool:
    if store.exists(MANIFEST) and not cfg.output.overwrite:
        log.info("%s already holds a finished run (manifest.json); nothing to do. "
                 "Pass --overwrite to train again.", store.uri)
        return True
    return False


def _run_locked(cfg: Config, run_dir: RunFolder, lock: RunLock, stop: StopSignal,
                group: Cluster | None = None) -> None:
    timings: dict[str, float] = {}
    state = _prepare(cfg, run_dir)
    now = time.time()
    # A resumed run keeps the start of its first attempt (``runs list`` shows its duration).
    earlier = (read_json(run_dir.path(STATUS), {}) or {}) if state else {}
    run_dir.set_status("running", error=None, started=now,
                       first_started=earlier.get("first_started") or earlier.get("started") or now,
                       resumed_from_epoch=state["epoch"] if state else None)
    try:
        _train(cfg, run_dir, state, lock, stop, timings, group)
    except LostOwnership:
        raise  # the run is another job's now: not even the status is ours to write
    except BaseException as exc:
        if run_dir.published:  # the manifest is up: the run is finished, whatever came after
            log.warning("after publishing: %s", exc)
            return
        if run_dir.manifest_sent:  # it may be stored: nothing may change the run now
            raise
        if isinstance(exc, Preempted):
            if not stop.claim_shutdown():
                _wait_for_exit()  # the watchdog is stopping the run: write nothing more
            run_dir.set_status("preempted", error=str(exc))
            # The whole shutdown fits in --grace-seconds: flush now, close and unlock after.
            left = stop.remaining(cfg.runtime.grace_seconds) - SHUTDOWN_RESERVE_SECONDS
            if not _flush_quietly(run_dir, left - STATUS_RESERVE_SECONDS):
                log.warning("grace period over before all uploads finished; the bucket "
                            "holds the last complete save point")
                # Its status still says running: a small write says preempted.
                _within(STATUS_RESERVE_SECONDS, functools.partial(
                    run_dir.mark_stored_status, "preempted", error=str(exc)), "trainjob-status")
            raise
        error = as_job_error(exc, peers=group is not None)
        run_dir.set_status("failed", error=str(error))
        _flush_quietly(run_dir, min(FAILURE_FLUSH_SECONDS, cfg.output.upload_timeout))
        log.error("run failed; local run folder kept at %s", run_dir.local)
        if error is exc:
            raise
        raise error from exc


def _wait_for_exit() -> None:
    """Block this thread: another (the signal watchdog) ends the process."""
    threading.Event().wait()


def _flush_quietly(run_dir: RunFolder, timeout: float) -> bool:
    """Send what is queued; the error being handled matters more than an upload's."""
    try:
        return run_dir.uploader.flush(timeout=max(0.0, timeout))
    except StorageError:
        return False


def _train(cfg: Config, run_dir: RunFolder, state: dict | None, lock: RunLock | None,
           stop: StopSignal, timings: dict[str, float], group: Cluster | None) -> None:
    cache = Path(cfg.data.cache_dir)
    with _timed(timings, "weights"):  # before the data: a missing file fails in seconds
        initial = weights.resolve(cfg.model.weights, cache / "downloads", cfg.runtime.threads)
    catalog, splits, dataset_summary = _load_data(cfg, timings)
    fingerprint = savepoints.fingerprint(cfg, catalog, splits)
    if state:
        savepoints.check_compatible(state, fingerprint)
    run_dir.write(CLASSES, {str(i): name for i, name in enumerate(catalog.classes)})
    configfile.write(cfg, run_dir, dataset_summary, timings, state, fingerprint=fingerprint)

    # TensorFlow is imported only now: bad input fails above in a second, with no TF noise.
    from trainjob.train import callbacks as callbacks_lib
    from trainjob.train import evaluation, inputs, trainer
    from trainjob.train import model as models

    with _timed(timings, "build"):
        num_classes = len(catalog.classes)
        work = Path(cfg.runtime.work_dir) / "tfcache"
        steps = inputs.steps_for(len(splits.train), cfg.optim.batch_size, cfg.optim.steps_per_epoch)
        # Before any TensorFlow op (collectives are configured at start-up), and after the
        # data, so that peers that fetch it slower are not timed out meanwhile.
        if group:  # from the save point the chief names; the chief alone after training
            from trainjob.train import collective, steploop
            strategy, state, replicas = collective.join(cfg, group, run_dir, state, stop,
                                                        fingerprint)
        else:
            strategy = trainer.make_strategy()
            replicas = strategy.num_replicas_in_sync
        train_base = inputs.decoded(splits.train, cfg.model.image_size, cfg.data.pipeline_cache,
                                    work, "train")
        if cfg.optim.batch_size % replicas:
            raise ConfigError(f"--batch-size {cfg.optim.batch_size} is the global batch: it "
                              f"must divide evenly among the {replicas} replicas")
        settings, cfg = cfg, trainer.scale_learning_rates(cfg, replicas)
        # Several workers: each takes its shard of every epoch in per-replica batches, and
        # every step is a full global batch (the data wraps), so all workers take as many.
        local = replicas // group.size if group else 1

        def train_stream(first: int, last: int, skip: int = 0):
            return inputs.training_stream(
                train_base, len(splits.train), num_classes, image_size=cfg.model.image_size,
                batch_size=cfg.optim.batch_size // (replicas if group else 1),
                steps=steps * local, repeat=group is not None or cfg.optim.steps_per_epoch
                is not None, shuffle=cfg.optim.shuffle, augment=cfg.optim.augment,
                seed=cfg.split.seed, first_epoch=first, epochs=last, skip_batches=skip * local,
                shard=(group.index, group.size) if group else (0, 1))

        val_base = inputs.decoded(splits.val, cfg.model.image_size, cfg.data.pipeline_cache,
                                  work, "val") if splits.val else None
        if val_base is not None and group:
            val_base = val_base.shard(group.size, group.index)
        val_ds = inputs.evaluation_stream(val_base, num_classes, cfg.optim.batch_size) \
            if val_base is not None else None
        if lock:  # the chief records how the run is spread
            configfile.write(settings, run_dir, dataset_summary, timings, state,
                            configfile.distribution(cfg, group, replicas), fingerprint)
        with strategy.scope():
            model = models.build_model(cfg.model, num_classes, initial)
            trainer.compile_model(model, cfg, num_classes)
            # Inside the scope: the optimizer's slots must be the strategy's variables too.
            if state:
                _restore(model, run_dir, state, callbacks_lib)
        if group:  # every worker starts alike, or none does
            collective.check_start(strategy, group, model, state, cfg.cluster.collective_timeout)
        first_epoch = state["epoch"] if state else 0
        history = savepoints.trim_logs(run_dir, first_epoch) if state else []
        run_state = RunState(run_dir, fingerprint=fingerprint, history=history, stop=stop,
                             restore=state, fence=run_dir.check)
        if state and not state.get("from_checkpoint"):
            run_state.reconcile_best(functools.partial(callbacks_lib.save_model_weights, model))
        keeper = callbacks_lib.RunKeeper(run_state, steps_per_epoch=steps,
                                         backup_every_steps=cfg.output.backup_every_steps)
        callbacks = callbacks_lib.make_callbacks(cfg, run_dir, keeper)

    with _timed(timings, "train"):
        if not (state and state.get("finished_training")):
            fit = functools.partial(
                steploop.fit if group else trainer.fit, model, val_ds=val_ds, cfg=cfg,
                callbacks=callbacks,
                weights=trainer.class_weights(splits.train, num_classes, cfg.optim.class_weight),
                **({"strategy": strategy, "cluster": group, "stop": stop} if group else {}))
            stop.in_training = True
            try:
                freeze = cfg.optim.freeze_backbone_epochs
                previous = phases.phase_of_record(state, freeze)
                for part in phases.plan(first_epoch, state.get("step", 0) if state else 0,
                                        freeze, cfg.optim.epochs):
                    if model.stop_training:  # EarlyStopping ends the run, in either phase
                        break
                    with strategy.scope():
                        trainer.enter_phase(model, cfg, num_classes, part.phase,
                                             phases.entry_rate(part.phase, previous, cfg.optim))
                    run_state.begin_phase(previous := part.phase)
                    keeper.step_offset = part.skip  # a mid-epoch restart: batches done
                    fit(train_stream(part.start, part.end, part.skip), steps=steps - part.skip,
                        initial_epoch=part.start, epochs=part.end)
            finally:
                stop.in_training = False
                stop.end_collective()
            run_state.stop_if_requested("at the end of training")
            run_state.finish_training()
        hold("after_training")
    if group:
        trainer.record_weights(model, Path(cfg.runtime.work_dir) / "worker-weights.json",
                                worker=group.index, epochs=len(keeper.history))
        if not group.is_chief:
            startpoint.wait_until_finished(run_dir.store, cfg.output.upload_timeout, group.index)
            log.info("worker %d: training done; the chief evaluates and publishes", group.index)
            return

    with _timed(timings, "evaluate"):
        best = run_dir.path("checkpoints/best.weights.h5")
        if cfg.callbacks.restore_best and best.exists():
            callbacks_lib.load_model_weights(model, best)
            log.info("restored the best weights (%s) for the final model",
                     cfg.callbacks.checkpoint_monitor)
        if cfg.callbacks.recalibrate_batchnorm:  # the batches BN normalized: per replica
            with _timed(timings, "recalibrate_batchnorm"):
                batch = cfg.optim.batch_size // replicas
                evaluation.recalibrate_batchnorm(
                    model, inputs.evaluation_stream(train_base, num_classes, batch),
                    max_batches=max(1, evaluation.PRECISE_BN_IMAGES // batch))
        test_ds = inputs.evaluation_stream(
            inputs.decoded(splits.test, cfg.model.image_size, "none", work, "test"),
            num_classes, cfg.optim.batch_size)
        metrics = evaluation.evaluate(model, test_ds, splits.test, catalog.classes,
                                    predict=steploop.predict if group else None)
        run_dir.write(METRICS, metrics)
        log.info("test: %s", {k: v for k, v in metrics.items()
                              if not isinstance(v, (dict, list))})
        from trainjob.train import exports, plots

        plots.plot_test_split(metrics, catalog.classes, run_dir.local)

    with _timed(timings, "publish"):
        run_dir.path(MODEL).parent.mkdir(parents=True, exist_ok=True)
        models.backbone_of(model).trainable = True  # loads like any model, after any phase
        exports.write_model(model, run_dir.local, cfg.output.export)  # no optimizer state
        plot_history(keeper.history, run_dir.path(PLOT))
        run_dir.set_status("succeeded", error=None, finished=time.time(),
                           epochs_done=len(keeper.history))
        configfile.write(settings, run_dir, dataset_summary, timings, state,
                        configfile.distribution(cfg, group, replicas), fingerprint)
        lock.check()
        run_dir.publish(timeout=cfg.output.upload_timeout, shield=stop.shield)
        stop.exit_code = 0  # published: a signal from now on ends the job with success
    log.info("run finished: %s", run_dir.store.uri)


def _restore(model, run_dir: RunFolder, state: dict, callbacks_lib) -> None:
    """Put the saved weights (and optimizer) back; a run resumed from its last checkpoint
    alone gets the weights only."""
    if state.get("from_checkpoint"):
        callbacks_lib.load_model_weights(model, run_dir.path(state["from_checkpoint"]))
        log.warning("resuming at epoch %d from %s without optimizer state", state["epoch"],
                    state["from_checkpoint"])
        return
    iterations = savepoints.restore_weights(model, run_dir, state)
    log.info("resuming at epoch %d, batch %d (optimizer iterations %d)", state["epoch"],
             state.get("step", 0), iterations)
    if not run_dir.path(LAST).exists() and not state.get("step"):
        # Not uploaded while training (it is the resume weights without the optimizer):
        # a run resumed on a new pod writes it back before it may be published.
        callbacks_lib.save_model_weights(model, run_dir.path(LAST))


def _load_data(cfg: Config, timings: dict[str, float]
               ) -> tuple[Catalog, Splits, dict]:
    """Download (cached), unpack, find the classes, check every image, split."""
    catalog, fetched = source.load_catalog(
        cfg.data.data, Path(cfg.data.cache_dir), include_background=cfg.data.include_background,
        max_extract_bytes=cfg.data.max_extract_bytes, max_bad_fraction=cfg.data.max_bad_fraction,
        threads=cfg.runtime.threads, scan_threads=source.scan_threads(),
        timed=functools.partial(_timed, timings))
    splits = split(catalog, val_fraction=cfg.split.val_fraction,
                            test_fraction=cfg.split.test_fraction,
                            train_per_class=cfg.split.train_per_class, seed=cfg.split.seed)
    log.info("%d classes, %d images: %s", len(catalog.classes), len(catalog.samples),
             splits.sizes())
    summary = {**catalog.summary(), "splits": splits.sizes(),
               "download": {"objects_downloaded": fetched.downloaded_objects,
                            "bytes_downloaded": fetched.downloaded_bytes,
                            "objects_cached": fetched.cached_objects}}
    return catalog, splits, summary


def _prepare(cfg: Config, run_dir: RunFolder) -> dict | None:
    """Make the local run folder match what the job should continue from; return resume state.

    A run whose state is unusable is never deleted: only --overwrite starts afresh."""
    store = run_dir.store
    if cfg.output.overwrite:
        log.info("--overwrite: removing the previous run at %s", store.uri)
        run_dir.confirm()
        _remove_run(run_dir)
        return None
    if run_dir.remote:  # the bucket is the truth: a new pod has no local files
        _clear_local(run_dir.local)
        run_dir.pull()
    if not (run_dir.path(savepoints.STATE).exists() or savepoints.saved_points(run_dir)):
        if run_dir.remote:
            _clear_local(run_dir.local)  # a run killed before its first save point
        return None
    state = savepoints.load_state(run_dir) or savepoints.from_last_checkpoint(run_dir)
    if state is None:
        raise ConfigError(
            f"cannot resume {store.uri}: no save point under {BACKUP}/ has intact weights and "
            f"there is no {LAST}; nothing was deleted: inspect it, or pass --overwrite to "
            "start afresh")
    return state


def _remove_run(run_dir: RunFolder) -> None:
    """Delete trainjob's own entries only: --output may be a bucket root with other data."""
    store = run_dir.store
    if run_dir.uploader.enabled:
        keys = [o.key for name in RUN_ENTRIES
                for o in [*store.list(name + "/"), *filter(None, [store.read_info(name)])]]
        store.delete(keys)
        _clear_local(run_dir.local)
    else:
        for name in RUN_ENTRIES:
            path = run_dir.path(name)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _clear_local(path: Path) -> None:
    for child in path.iterdir():
        if not child.name.startswith(".staging-"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _local_run_dir(cfg: Config) -> Path:
    scheme, _, key = uri.parse_uri(cfg.output.output)
    if scheme == "file":
        return Path(key).expanduser().absolute()
    digest = hashlib.sha1(cfg.output.output.rstrip("/").encode()).hexdigest()[:16]
    return Path(cfg.runtime.work_dir) / "runs" / digest


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.monotonic() - start
