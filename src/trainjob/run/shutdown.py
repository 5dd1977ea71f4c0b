"""How a run ends when it does not finish: stopped by a signal inside its grace period,
failed with its error in the status, or taken over (nothing written). Also the lock's
release, bounded the same way. Nothing here imports TensorFlow."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator

from trainjob.config import Config
from trainjob.errors import LostOwnership, Preempted, StorageError, TrainJobError, as_job_error
from trainjob.run.folder import RunFolder
from trainjob.run.lock import RunLock
from trainjob.run.stop import StopSignal
from trainjob.run.tracking import Tracker

log = logging.getLogger(__name__)

FAILURE_FLUSH_SECONDS = 60.0
SHUTDOWN_RESERVE_SECONDS = 3.0  # of the grace period: closing the uploader, the lock
STATUS_RESERVE_SECONDS = 2.0  # of the grace period: marking the stored status, if need be
TRACKING_STOP_SECONDS = 1.0  # an MLflow run's final status, when the job fails or stops


@contextlib.contextmanager
def outcome_recorded(run_dir: RunFolder, stop: StopSignal, cfg: Config,
                     several: bool = False, tracker: Tracker | None = None) -> Iterator[None]:
    """Record in the status how the run inside ended, if it did not publish: ``preempted``
    (flushed within the grace period), or ``failed`` with its error mapped to the exit code
    it deserves; nothing at all once the run is another job's, or once its manifest is
    sent. ``several``: workers train together (a lost peer is exit 4). The MLflow run, if
    any, ends the same way (KILLED, FAILED; untouched once the run is another job's)."""
    try:
        yield
    except LostOwnership:
        if tracker:
            tracker.close(None, TRACKING_STOP_SECONDS)
        raise  # the run is another job's now: not even the status is ours to write
    except BaseException as exc:
        if run_dir.published:  # the manifest is up: the run is finished, whatever came after
            log.warning("after publishing: %s", exc)
            if tracker:
                tracker.close("FINISHED", TRACKING_STOP_SECONDS)
            return
        if run_dir.manifest_sent:  # it may be stored: nothing may change the run now
            raise
        if isinstance(exc, Preempted):
            _stopped(run_dir, stop, cfg, str(exc))
            if tracker:  # inside the grace period: what is left of the shutdown reserve
                tracker.close("KILLED", min(TRACKING_STOP_SECONDS, stop.remaining() - 2.5))
            raise
        error = as_job_error(exc, peers=several)
        run_dir.set_status("failed", error=str(error))
        flush_quietly(run_dir, min(FAILURE_FLUSH_SECONDS, cfg.output.upload_timeout))
        if tracker:
            tracker.close("FAILED", TRACKING_STOP_SECONDS)
        log.error("run failed; local run folder kept at %s", run_dir.local)
        if error is exc:
            raise
        raise error from exc


def _stopped(run_dir: RunFolder, stop: StopSignal, cfg: Config, why: str) -> None:
    """The status says preempted, and what was saved is flushed, all within the grace
    period; if the flush runs out, the stored status gets a small write of its own."""
    if not stop.claim_shutdown():
        wait_for_exit()  # the watchdog is stopping the run: write nothing more
    run_dir.set_status("preempted", error=why)
    # The whole shutdown fits in --grace-seconds: flush now, close and unlock after.
    left = stop.remaining(cfg.runtime.grace_seconds) - SHUTDOWN_RESERVE_SECONDS
    if not flush_quietly(run_dir, left - STATUS_RESERVE_SECONDS):
        log.warning("grace period over before all uploads finished; the bucket holds the "
                    "last complete save point")
        # Its status still says running: a small write says preempted.
        within(STATUS_RESERVE_SECONDS, functools.partial(
            run_dir.mark_stored_status, "preempted", error=why), "trainjob-status")


def stop_now(run_dir: RunFolder, lock: RunLock, reason: str) -> None:
    """The signal watchdog's stop, for a main thread still inside a step or a collective
    when the grace period is nearly over: the status the output holds says preempted (it
    describes the newest save point wholly stored), and the lock goes back."""
    if run_dir.remote:
        within(STATUS_RESERVE_SECONDS, functools.partial(
            run_dir.mark_stored_status, "preempted", error=reason), "trainjob-status")
    else:
        try:
            run_dir.check()
            run_dir.set_status("preempted", error=reason)
        except TrainJobError as exc:
            log.warning("could not mark the run preempted: %s", exc)
    within(1.0, lock.release, "trainjob-unlock")


def release(lock: RunLock, stop: StopSignal) -> None:
    """Release the lock; after a signal, only within what is left of the grace period (a
    lock left behind goes stale, and the Job's next pod takes it over by owner id)."""
    if not (stop.requested or stop.signalled):
        lock.release()
        return
    if not within(stop.remaining() - 1.5, lock.release, "trainjob-unlock"):
        log.warning("grace period over: the run lock is left to go stale")


def within(seconds: float, action: Callable[[], object], name: str) -> bool:
    """Run ``action`` in a daemon thread and wait at most ``seconds`` for it (a store that
    stopped answering cannot hold the exit); returns whether it finished."""
    worker = threading.Thread(target=action, name=name, daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    return not worker.is_alive()


def wait_for_exit() -> None:
    """Block this thread: another (the signal watchdog) ends the process."""
    threading.Event().wait()


def flush_quietly(run_dir: RunFolder, timeout: float) -> bool:
    """Send what is queued; the error being handled matters more than an upload's."""
    try:
        return run_dir.uploader.flush(timeout=max(0.0, timeout))
    except StorageError:
        return False
