"""Run state that any training loop drives: save points, epoch records, upload generations,
and the checks made at every batch end (stop signal, ownership of the run).

A Keras callback (``callbacks.RunKeeper``) or a custom loop calls ``end_epoch``,
``save_point`` and ``check``; this layer decides what is written, in which order, and what
goes to the bucket together. Nothing here imports TF: the loop hands over a function that
writes the weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainjob.errors import Preempted
from trainjob.run import savepoints
from trainjob.run.folder import BEST, BEST_STAGED, HISTORY, LOG_CSV, STATUS, RunFolder
from trainjob.run.stop import StopSignal
from trainjob.store.digests import sha256

log = logging.getLogger(__name__)

WriteWeights = Callable[[Path], None]
# Writes files derived from the epoch records (e.g. TensorBoard events); returns them,
# relative to the run folder, to go up in the epoch's generation.
EpochWriter = Callable[[list[dict]], list[str]]


class RunState:
    """What a training loop records, and when it must stop."""

    def __init__(self, run: RunFolder, *, fingerprint: dict, history: list[dict],
                 stop: StopSignal, restore: dict | None = None,
                 fence: Callable[[], None] | None = None, workers: int = 1) -> None:
        self.run = run
        # Recorded in save points: a streamed epoch resumed mid-way needs as many workers.
        self.workers = workers
        self.fingerprint = fingerprint
        self.history = history
        self.stop = stop
        self.restore = restore  # the save point this process started from, if any
        self.fence = fence or (lambda: None)  # raises LostOwnership once the run is not ours
        self.seq = max([int((restore or {}).get("seq", 0)), *savepoints.saved_points(run)])
        self._good_seq = int((restore or {}).get("seq", 0))  # the newest usable local pair
        self._stored_seq = self._good_seq  # the newest pair in the store
        self.phase: str | None = None  # the fine-tuning phase being trained (phases.py)
        self.epoch_writers: list[EpochWriter] = []
        # The best checkpoint the newest save point follows on from: its sha256 and epoch.
        self.best: dict | None = (restore or {}).get("best")
        # Told each epoch whose save point is stored (a tracker logs it only then).
        self.stored_listeners: list[Callable[[int], None]] = []

    def add_epoch_writer(self, writer: EpochWriter) -> None:
        """Call ``writer`` with the history now (a resumed run rewrites what it derives
        from the trimmed history) and after each epoch, its files in that generation."""
        self.epoch_writers.append(writer)
        writer(self.history)

    # --- at every batch end -------------------------------------------------------------

    def check(self) -> None:
        """Raise if this job must stop writing (the run lock went elsewhere)."""
        self.fence()

    def stop_if_requested(self, where: str) -> None:
        if self.stop.requested:
            raise Preempted(f"stopped by signal {where}")

    def begin_phase(self, phase: str) -> None:
        """Training enters ``phase``: recorded in save points, history rows and the status."""
        self.phase = phase
        self.run.set_status("running", phase=phase, upload=False)

    # --- save points --------------------------------------------------------------------

    def save_point(self, *, epoch: int, step: int, write_weights: WriteWeights,
                   iterations: int, callbacks: dict[str, dict[str, Any]]) -> dict:
        """A mid-epoch resume point: start epoch ``epoch`` after ``step`` batches. Written
        as a new pair and sent to the store as one generation."""
        record = self._write_pair(epoch, step, write_weights, iterations, callbacks)
        self._commit(f"epoch {epoch} step {step}", ())
        return record

    def end_epoch(self, epoch: int, row: dict, *, write_weights: WriteWeights,
                  iterations: int, callbacks: dict[str, dict[str, Any]]) -> None:
        """Epoch ``epoch`` is done. Its history row, resume pair and status go to the store
        as one generation, status last: a status showing epoch k means the bucket holds
        epoch k's resume state and logs."""
        if self.phase is not None:
            row = {**row, "phase": self.phase}
        self.history.append(row)
        self.run.write(HISTORY, self.history, upload=False)
        derived = [rel for writer in self.epoch_writers for rel in writer(self.history)]
        staged = self.run.path(BEST_STAGED)
        if staged.exists():  # ModelCheckpoint found a new best in this epoch
            self.best = {"sha256": sha256(staged), "epoch": epoch}
        self._write_pair(epoch + 1, 0, write_weights, iterations, callbacks)
        if staged.exists():  # only now: the best never describes an epoch a resume redoes
            os.replace(staged, self.run.path(BEST))
        self.run.set_status("running", epoch=epoch, epochs_done=epoch + 1, metrics=row,
                            phase=self.phase, upload=False)
        self._commit(f"epoch {epoch}", (BEST, *derived), epoch=epoch)

    def reconcile_best(self, write_best: WriteWeights) -> None:
        """On resume: make checkpoints/best.weights.h5 the one the save point follows on
        from. A job stopped after storing the record but before the best checkpoint left
        an older one behind: where the save point's own weights are the best (the best
        epoch is the one it ends), ``write_best`` writes them again; otherwise that best
        is lost, and the best checkpoint starts again from here (never a stale one)."""
        path = self.run.path(BEST)
        if self.best is None or (path.exists() and sha256(path) == self.best["sha256"]):
            return
        record = self.restore or {}
        if self.best["epoch"] == int(record.get("epoch", 0)) - 1 and not record.get("step"):
            write_best(path)
            self.best = {"sha256": sha256(path), "epoch": self.best["epoch"]}
            log.info("wrote %s again from the save point: its upload had not finished", BEST)
            return
        log.warning("%s is not the best epoch's (%d): its upload had not finished when the "
                    "job stopped, and those weights are gone; the best checkpoint starts "
                    "again from epoch %s", BEST, self.best["epoch"], record.get("epoch"))
        path.unlink(missing_ok=True)
        self.best = None
        self.restore = {**record, "callbacks": {
            key: value for key, value in record.get("callbacks", {}).items()
            if not key.startswith("ModelCheckpoint")}}

    def _write_pair(self, epoch: int, step: int, write_weights: WriteWeights, iterations: int,
                    callbacks: dict[str, dict[str, Any]]) -> dict:
        self.check()
        self.seq += 1
        record = savepoints.write_point(self.run, self.seq, {
            "epoch": epoch, "step": step, "iterations": iterations, "callbacks": callbacks,
            "phase": self.phase, "fingerprint": self.fingerprint, "best": self.best,
            "workers": self.workers,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, write_weights)
        # Keep the pair this one follows on from (not seq - 1: that may be a broken pair
        # that a resume skipped).
        savepoints.prune_local(self.run, {self.seq, self._good_seq})
        self._good_seq = self.seq
        self.restore = record  # a second fit() in this process restores from here
        return record

    def finish_training(self) -> None:
        """All epochs ran (or EarlyStopping ended them): a restart before publishing goes
        straight to evaluation."""
        if self.restore is None:
            return
        seq = int(self.restore.get("seq", 0))
        self.restore = {**self.restore, "finished_training": True}
        # The pair's own record too, so a fallback to it knows training was over.
        weights, record = savepoints.pair_files(seq) if seq else (None, None)
        rels = [*([record] if record else []), savepoints.STATE]
        for rel in rels:
            self.run.write(rel, self.restore, upload=False)
        # Without --sync nothing of the resume state is stored yet: store it whole, weights
        # and best checkpoint too (a restart evaluates and publishes), never half of it.
        whole = [] if self.run.sync or not weights else [weights, BEST]
        epochs = len(self.history)
        self.run.uploader.commit([*whole, *rels], label="training finished",
                                 after=[lambda: self._stored(epochs - 1)] if epochs else ())
        if not self.run.uploader.enabled and epochs:
            self._stored(epochs - 1)

    def _commit(self, label: str, extra: tuple[str, ...], epoch: int | None = None) -> None:
        if not (self.run.sync and self.run.uploader.enabled):
            if self.run.sync and epoch is not None:  # the local folder is the output
                self._stored(epoch)
            return
        weights, record = savepoints.pair_files(self.seq)
        self.run.uploader.commit(
            [weights, record, savepoints.STATE, *extra, LOG_CSV, HISTORY, STATUS],
            label=label, transient=(weights, record),
            after=[lambda seq=self.seq: self._prune_store(seq),
                   *([lambda: self._stored(epoch)] if epoch is not None else [])])

    def _stored(self, epoch: int) -> None:
        for listener in self.stored_listeners:
            listener(epoch)

    def _prune_store(self, seq: int) -> None:
        """Runs once generation ``seq`` is stored: keep it and the pair stored before it
        (which may be older than seq - 1, when the uploader skipped generations)."""
        keep = {seq, self._stored_seq}
        self._stored_seq = seq
        keys = [o.key for o in self.run.store.list(savepoints.BACKUP + "/")]
        if stale := savepoints.stale_keys(keys, keep):
            self.run.confirm()
            self.run.store.delete(stale)
