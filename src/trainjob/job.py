"""``run(cfg)``: the training job, top to bottom. Each step is one call into the layer that
owns it (docs/architecture.md maps every step to its module)."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from trainjob import termination
from trainjob.config import Config
from trainjob.data import source, stream
from trainjob.data.catalog import Dataset, check_test_split, split
from trainjob.data.packed import packed_store
from trainjob.errors import ConfigError, as_job_error
from trainjob.run import cluster, configfile, resumption, savepoints, shutdown, startpoint, tracking
from trainjob.run.cluster import Cluster
from trainjob.run.folder import CLASSES, RunFolder
from trainjob.run.lock import RunLock
from trainjob.run.stop import StopSignal
from trainjob.store import hostcache
from trainjob.store.base import Store
from trainjob.store.client import redact
from trainjob.store.s3 import S3Store
from trainjob.store.uri import open_store
from trainjob.train import weights

log = logging.getLogger(__name__)


def run(cfg: Config) -> None:
    """Train on ``cfg.data`` and publish the run folder to ``cfg.output``."""
    stop = StopSignal(cfg.runtime.grace_seconds)
    stop.on_exit = termination.write  # the watchdog's exits are told like any other
    stop.install()
    group = cluster.resolve(cfg.cluster)  # None: this job trains alone
    if group and cfg.optim.batch_size % group.size:
        raise ConfigError(f"--batch-size {cfg.optim.batch_size} is the global batch: it must "
                          f"divide evenly among the {group.size} workers")
    store = _open_output(cfg)
    if resumption.finished(store, cfg):
        return
    if group and not group.is_chief:
        _follow(cfg, store, group, stop)  # another worker holds the lock and writes the run
        return
    lock = RunLock(store)
    lock.acquire(force=cfg.output.force, timeout=cfg.output.lock_timeout)
    try:
        if resumption.finished(store, cfg):  # it finished while we waited for the lock
            return
        # The cache folders this run reads stay locked (shared) until it ends: no other job
        # on this host prunes or rewrites them meanwhile.
        with (hostcache.session(),
              RunFolder(resumption.local_folder(cfg), store, sync=cfg.output.sync,
                        lease=lock) as run_dir):
            # What the signal watchdog does if training does not stop within the grace period.
            stop.emergency = functools.partial(shutdown.stop_now, run_dir, lock)
            _run_locked(cfg, run_dir, lock, stop, group)
    finally:
        shutdown.release(lock, stop)


def _open_output(cfg: Config) -> Store:
    """The output's store; a missing bucket fails in seconds, not after the download."""
    store = open_store(cfg.output.output, cfg.runtime.threads)
    if isinstance(store, S3Store):
        store.check_bucket()
    return store


def _follow(cfg: Config, store: Store, group: Cluster, stop: StopSignal) -> None:
    """A worker that is not the chief trains in a private folder, from the save point the
    chief names at start-up, and writes nothing of the run."""
    if not cfg.output.overwrite and startpoint.finished(store, group.index):
        return
    with (hostcache.session(),
          RunFolder(Path(cfg.runtime.work_dir) / f"worker-{group.index}", store,
                    read_only=True) as run_dir):
        resumption.clear_local(run_dir.local)
        try:
            _train(cfg, run_dir, None, stop, group, lock=None)
        except Exception as exc:  # out of memory is exit 5 here too, as on the chief
            if (error := as_job_error(exc, f"worker {group.index}: ", peers=True)) is exc:
                raise
            raise error from exc


def _run_locked(cfg: Config, run_dir: RunFolder, lock: RunLock | None, stop: StopSignal,
                group: Cluster | None = None) -> None:
    """The run under its lock: continue from the save point the output holds, train,
    publish; a stop or a failure is recorded in the status (run.shutdown)."""
    state = resumption.prepare(cfg, run_dir)
    resumption.mark_running(run_dir, state)
    tracker = tracking.start(cfg, run_dir)  # None: the run is not tracked (MLflow)
    with shutdown.outcome_recorded(run_dir, stop, cfg, group is not None, tracker):
        _train(cfg, run_dir, state, stop, group, lock, tracker)


def _train(cfg: Config, run_dir: RunFolder, state: dict | None, stop: StopSignal,
           group: Cluster | None, lock: RunLock | None,
           tracker: tracking.Tracker | None = None) -> None:
    """Weights and data first (bad input fails in a second), then the TensorFlow session:
    build, fit, evaluate; then the run is published."""
    record = configfile.RunRecord(run_dir, cfg, state)
    with record.timed("weights"):  # before the data: a missing file fails in seconds
        initial = weights.resolve(cfg.model.weights, Path(cfg.data.cache_dir) / "downloads",
                                  cfg.runtime.threads)
    data = _load_data(cfg, record)
    check_test_split(data, redact(cfg.data.data), cfg.split.test_fraction)
    record.dataset = data.summary
    record.fingerprint = savepoints.fingerprint(cfg, data)
    if state:
        savepoints.check_compatible(state, record.fingerprint)
    run_dir.write(CLASSES, {str(i): name for i, name in enumerate(data.classes)})
    record.write()

    # TensorFlow is imported only now: bad input fails above in a second, with no TF noise.
    from trainjob.train.session import Session

    with record.timed("build"):
        session = Session.start(cfg, run_dir, data, state, initial, stop, group,
                                record.fingerprint, record.timed)
    # The first step's time, tracing apart, joins the start's phases in config.json.
    session.keeper.clock.report = functools.partial(_record_first_step, record, lock)
    record.state, record.distribution = session.state, configfile.distribution(
        session.cfg, group, session.replicas)
    if lock:  # the chief records how the run is spread
        record.write()
    if tracker:
        tracker.follow(session.run_state)
    with record.timed("train"):
        session.fit()
    if group:
        session.leave()
    if not session.publishes:
        return
    with record.timed("evaluate"):
        session.evaluate(record.timed)
    with record.timed("publish"):
        session.write_final_files()
        run_dir.set_status("succeeded", error=None, finished=time.time(),
                           epochs_done=session.epochs_done)
        record.write()
        lock.check()
        run_dir.publish(timeout=cfg.output.upload_timeout, shield=stop.shield)
        stop.exit_code = 0  # published: a signal from now on ends the job with success
    if tracker:
        tracker.finish(run_dir)
    log.info("run finished: %s", run_dir.store.uri)


def _record_first_step(record: configfile.RunRecord, lock: RunLock | None,
                       took: dict[str, float]) -> None:
    record.timings.update(took)
    log.info("first training step done (tracing %.1f s, then %.1f s to the step's end)",
             took["tracing"], took["first_step"])
    if lock:
        record.write()


def _load_data(cfg: Config, record: configfile.RunRecord) -> Dataset:
    """A packed dataset: its index (the shards are streamed while training). Else download
    (cached), unpack, find the classes, check every image, split."""
    with record.timed("index"):  # one HEAD: is --data a packed dataset?
        packed = packed_store(cfg.data.data, cfg.runtime.threads)
        if packed is not None:
            data = source.load_packed(packed, {
                "val_fraction": cfg.split.val_fraction, "test_fraction": cfg.split.test_fraction,
                "train_per_class": cfg.split.train_per_class,
                "include_background": cfg.data.include_background})
            stream.buffer_shards(cfg.data.stream_buffer, data.packed.index.shards)  # exit 2
            return data
    catalog, fetched = source.load_catalog(
        cfg.data.data, Path(cfg.data.cache_dir), include_background=cfg.data.include_background,
        max_extract_bytes=cfg.data.max_extract_bytes, max_bad_fraction=cfg.data.max_bad_fraction,
        threads=cfg.runtime.threads, scan_threads=source.scan_threads(), timed=record.timed)
    splits = split(catalog, val_fraction=cfg.split.val_fraction,
                   test_fraction=cfg.split.test_fraction,
                   train_per_class=cfg.split.train_per_class, seed=cfg.split.seed)
    log.info("%d classes, %d images: %s", len(catalog.classes), len(catalog.samples),
             splits.sizes())
    summary = {**catalog.summary(), "splits": splits.sizes(),
               "download": {"objects_downloaded": fetched.downloaded_objects,
                            "bytes_downloaded": fetched.downloaded_bytes,
                            "objects_cached": fetched.cached_objects}}
    return Dataset(catalog, splits, summary)
