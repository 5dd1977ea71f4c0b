"""Resume state under ``backup/``: save points, reading them back, checking them, trimming
the logs to them; and the stop signal. Nothing here imports TF.

A save point is a *pair*: ``backup/state-<seq>.weights.h5`` (weights and optimizer) and
``backup/state-<seq>.json`` (where training stands, callback state, the weights' sha256).
Every save writes a new pair under new names, and ``backup/state.json`` is a copy of the
newest record. Older pairs are deleted only once a newer one is stored, locally and in the
bucket, so a pair broken by a kill or a lost upload falls back to the one before it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from trainjob.artifacts import BACKUP, CLASSES, CONFIG, HISTORY, LAST, LOG_CSV, RunFolder, \
    read_json, sha256, write_json
from trainjob.errors import ConfigError, Preempted

if TYPE_CHECKING:  # TensorFlow stays unimported until training starts
    import keras

    from trainjob.config import Config
    from trainjob.datasets import Catalog, Splits

log = logging.getLogger(__name__)

STATE = f"{BACKUP}/state.json"
LEGACY_WEIGHTS = f"{BACKUP}/state.weights.h5"  # the single pair of trainjob <= 0.1
_PAIR = re.compile(r"state-(\d+)\.json$")
KEEP_PAIRS = 2
# Callback attributes Keras resets in on_train_begin and never saves.
CALLBACK_STATE = {
    "EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}


def pair_files(seq: int) -> tuple[str, str]:
    """(weights, record) of save point ``seq``, relative to the run folder."""
    return f"{BACKUP}/state-{seq:06d}.weights.h5", f"{BACKUP}/state-{seq:06d}.json"


def weights_of(record: dict) -> str:
    return f"{BACKUP}/{record['weights']}" if record.get("weights") else LEGACY_WEIGHTS


SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Of the grace period, what the watchdog's own stop needs (marking the stored status, 2 s;
# releasing the lock, 1 s; exiting): it starts when this much is left.
WATCHDOG_RESERVE_SECONDS = 3.5
EXIT_MARGIN_SECONDS = 0.3  # the process is gone this long before the grace period ends


class StopSignal:
    """SIGTERM/SIGINT: the first asks training to stop at the next batch end (outside
    training it raises at once), the second exits.

    With several workers (``collective`` set), a signal is only *signalled* here: the
    training loop shares it with the group, and every worker stops (``requested``) after
    the same step, through ``agree``.

    Python runs signal handlers in the main thread between bytecodes, so a main thread
    inside a step that does not return (the first trace of a large model, XLA, a collective
    whose peer hung) would hear of a signal only after the Kubernetes grace period. So a
    watchdog thread hears every signal at once (``signal.set_wakeup_fd``): a second signal
    exits at once, and if the main thread has not begun its own shutdown when only
    WATCHDOG_RESERVE_SECONDS of the grace period are left, the watchdog stops the run
    itself (``emergency``: the stored status marked preempted, the lock released) and exits
    143. Whoever begins the shutdown first owns it (``claim_shutdown``)."""

    def __init__(self, grace: float = 25.0) -> None:
        self.grace = grace
        self.signalled_at: float | None = None
        self.requested_at: float | None = None
        self.signal_name = "SIGTERM"
        self.in_training = False
        self.collective = False
        self.shielded = False  # publishing the manifest: a signal must not interrupt it
        self.exit_code = Preempted.exit_code  # the watchdog's; 0 once the run is published
        # Run by the watchdog when the main thread did not stop in time (set by the job once
        # it has a run folder and a lock); ``on_exit(code, reason)`` just before it exits.
        self.emergency: Callable[[str], None] | None = None
        self.on_exit: Callable[[int, str], None] = lambda code, reason: None
        self._mutex = threading.Lock()
        self._shutdown = threading.Lock()  # held by whoever runs the shutdown
        self._heard = {"handler": 0, "watchdog": 0}  # signals each side has seen
        self._watchdog: threading.Thread | None = None

    def install(self) -> None:
        """Take SIGTERM and SIGINT (again: TensorFlow's coordination service installs a
        handler of its own), and start the watchdog once. Call from the main thread."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        if self._watchdog is None:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._sockets = (reader, writer)  # kept open for the process's life
            self._watchdog = threading.Thread(target=self._watch, args=(reader,),
                                              name="trainjob-signals", daemon=True)
            self._watchdog.start()

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self._heard_one(signum, "handler"):
            self._exit_now("stopped by a second signal")
        if not self.in_training and not self.shielded:
            raise Preempted(f"stopped by {self.signal_name} outside training")

    def _heard_one(self, signum: int, side: str) -> bool:
        """Record a signal seen by ``side``; False when that side has now seen two."""
        with self._mutex:
            self._heard[side] += 1
            if self._heard[side] > 1:
                return False
            first = self.signalled_at is None
            if first:
                self.signalled_at = time.monotonic()
                self.signal_name = signal.Signals(signum).name
                if not self.collective:
                    self.requested_at = self.signalled_at
        if first:
            log.warning("%s received: stopping after the current batch (grace period %gs)",
                        self.signal_name, self.grace)
        return True

    def _watch(self, reader: socket.socket) -> None:
        deadline: float | None = None
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._stop_in_time()
                return
            ready, _, _ = select.select([reader], [], [], wait)
            for signum in reader.recv(64) if ready else b"":
                if signum not in SIGNALS:
                    continue
                if not self._heard_one(signum, "watchdog"):
                    self._exit_now("stopped by a second signal")
                if deadline is None:
                    deadline = self.signalled_at + self.grace - WATCHDOG_RESERVE_SECONDS

    def _stop_in_time(self) -> None:
        """The grace period is nearly over: stop the run here if the main thread has not
        begun to; else give its (bounded) shutdown until the end of the grace period."""
        end = self.signalled_at + self.grace - EXIT_MARGIN_SECONDS
        if self._shutdown.acquire(blocking=False):
            reason = (f"stopped by {self.signal_name}: the grace period ran out while a step "
                      "or a collective had not returned; the store keeps the newest save "
                      "point wholly stored")
            log.warning("%s", reason)
            if self.emergency is not None:
                worker = threading.Thread(target=self.emergency, args=(reason,),
                                          name="trainjob-emergency", daemon=True)
                worker.start()
                worker.join(max(0.0, end - time.monotonic()))
            self._exit_now(reason)
        time.sleep(max(0.0, end - time.monotonic()))
        self._exit_now(f"stopped by {self.signal_name}: the shutdown outlasted the grace "
                       "period")

    def _exit_now(self, reason: str) -> None:
        """Leave at once, from any thread: whatever is in flight is abandoned."""
        code = self.exit_code
        try:
            self.on_exit(code, reason)
            if code:
                sys.stderr.write(f"trainjob: error: {reason}\n")
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    def claim_shutdown(self) -> bool:
        """The main thread begins its shutdown; False if the watchdog already has (the
        process is about to exit: the caller must not write anything more)."""
        return self._shutdown.acquire(blocking=False)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """A signal does not interrupt what runs inside (storing the manifest: once it is
        sent, the run is finished), and the watchdog does not stop the run meanwhile."""
        self._shutdown.acquire(blocking=False)
        self.shielded = True
        try:
            yield
        finally:
            self.shielded = False

    def agree(self, why: str) -> None:
        """Stop with the rest of the group, after this step."""
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            log.warning("%s: stopping after this batch", why)

    def end_collective(self) -> None:
        """Training with the group is over: a signal this worker got now stops it alone."""
        self.collective = False
        if self.signalled_at is not None and self.requested_at is None:
            self.requested_at = self.signalled_at

    @property
    def signalled(self) -> bool:
        return self.signalled_at is not None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def remaining(self, grace: float | None = None) -> float:
        """Seconds left of the grace period (all of it while no signal came)."""
        grace = self.grace if grace is None else grace
        start = self.signalled_at if self.signalled_at is not None else self.requested_at
        if start is None:
            return grace
        return max(0.0, grace - (time.monotonic() - start))


def write_point(run: RunFolder, seq: int, record: dict,
                write_weights: Callable[[Path], None]) -> dict:
    """Save pair ``seq``: weights first under a new name, then the record that names them.

    A kill at any moment leaves the previous pair whole: nothing is overwritten. Where the
    local folder is the output itself, the run lock is confirmed before the record."""
    weights_rel, record_rel = pair_files(seq)
    weights = run.path(weights_rel)
    weights.parent.mkdir(parents=True, exist_ok=True)
    partial = weights.with_name("partial." + weights.name)
    write_weights(partial)
    os.replace(partial, weights)
    record = {**record, "seq": seq, "weights": Path(weights_rel).name,
              "weights_sha256": sha256(weights)}
    if not run.remote:
        run.confirm()
    write_json(run.path(record_rel), record)
    write_json(run.path(STATE), record)
    return record


def saved_points(run: RunFolder) -> list[int]:
    """Sequence numbers of the records under backup/, oldest first."""
    folder = run.path(BACKUP)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _PAIR.match(p.name)))


def prune_local(run: RunFolder, keep: set[int]) -> None:
    """Delete local pairs not in ``keep`` (and the legacy pair, once a new one exists)."""
    folder = run.path(BACKUP)
    names = [f"{BACKUP}/{p.name}" for p in folder.iterdir()] if folder.is_dir() else []
    for rel in stale_keys(names, keep):
        run.path(rel).unlink(missing_ok=True)


def stale_keys(keys: list[str], keep: set[int]) -> list[str]:
    """Of the files under backup/ (local or in the store), the pair files outside ``keep``."""
    out = []
    for key in keys:
        m = re.match(rf"{BACKUP}/(?:partial\.)?state-(\d+)\.", key)
        if (m and int(m.group(1)) not in keep) or key == LEGACY_WEIGHTS:
            out.append(key)
    return out


def load_state(run: RunFolder) -> dict | None:
    """The newest save point whose weights are intact; older ones if the newest is broken."""
    records = [r for seq in reversed(saved_points(run))
               if (r := read_json(run.path(pair_files(seq)[1])))]
    pointer = read_json(run.path(STATE))
    if pointer and not any(r.get("seq") == pointer.get("seq") for r in records):
        records.insert(0, pointer)  # written by trainjob <= 0.1, or its record is gone
    for record in records:
        weights = run.path(weights_of(record))
        if not weights.is_file():
            why = "its weights file is missing"
        elif sha256(weights) != record.get("weights_sha256"):
            why = "its weights do not match the recorded sha256"
        else:
            return record
        log.warning("resume point at epoch %s step %s is unusable (%s); trying an older one",
                    record.get("epoch"), record.get("step"), why)
    return None


def from_last_checkpoint(run: RunFolder) -> dict | None:
    """With no usable save point: continue from checkpoints/last.weights.h5, if there is
    one, after the epochs history.json records (the optimizer restarts from zero).

    The record carries the settings the run was trained with, so that the resume is checked
    like any other (``check_compatible``); with no record of them, ConfigError."""
    if not run.path(LAST).is_file():
        return None
    history = read_json(run.path(HISTORY), []) or []
    saved, source = recorded_fingerprint(run)
    record = {"epoch": len(history), "step": 0, "from_checkpoint": LAST, "callbacks": {},
              "fingerprint": saved}
    log.warning("no usable resume point: continuing from %s after epoch %d, with a fresh "
                "optimizer state; the settings are checked against %s", LAST, len(history),
                source)
    return record


def recorded_fingerprint(run: RunFolder) -> tuple[dict, str]:
    """(the settings the run started with, where they were found): the newest readable save
    point record (whatever became of its weights), else config.json's fingerprint, else
    what config.json's settings and classes.json tell (a run of an older trainjob)."""
    records = [pair_files(seq)[1] for seq in reversed(saved_points(run))] + [STATE]
    for rel in records:
        record = read_json(run.path(rel))
        if isinstance(record, dict) and record.get("fingerprint"):
            return record["fingerprint"], rel
    config = read_json(run.path(CONFIG))
    if isinstance(config, dict) and config.get("fingerprint"):
        return config["fingerprint"], CONFIG
    if isinstance(config, dict) and isinstance(config.get("settings"), dict):
        return _from_settings(config["settings"], read_json(run.path(CLASSES))), \
            f"{CONFIG}'s settings"
    raise ConfigError(
        f"cannot resume {run.store.uri} from {LAST}: no save point record under {BACKUP}/ and "
        f"no {CONFIG} tell the settings it was trained with, so a changed --seed or split "
        "could not be noticed; nothing was deleted: pass --overwrite to start afresh")


# The settings in a fingerprint, and the group of Config (and of config.json's settings) each
# belongs to; besides them, the class list and the images of each split.
FINGERPRINT_SETTINGS = {"image_size": "model", "optimizer": "optim", "seed": "split",
                        "val_fraction": "split", "test_fraction": "split",
                        "train_per_class": "split", "batch_size": "optim",
                        "steps_per_epoch": "optim", "freeze_backbone_epochs": "optim"}


def fingerprint(cfg: Config, catalog: Catalog, splits: Splits) -> dict:
    """The settings a resumed run must share with its start: the model, the optimizer and
    everything that decides which images go where, how many batches an epoch has, and
    which epochs train the head alone."""
    def digest(samples: list) -> str:
        # Class name + file name: the same wherever the data was extracted.
        names = sorted(f"{catalog.classes[s.label]}/{Path(s.path).name}" for s in samples)
        return hashlib.sha1("\n".join(names).encode()).hexdigest()

    return {
        "classes": _classes_digest(catalog.classes),
        **{key: getattr(getattr(cfg, group), key) for key, group in FINGERPRINT_SETTINGS.items()},
        "samples": digest(splits.train + splits.val + splits.test) + ":" + digest(splits.train),
    }


def _classes_digest(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def _from_settings(settings: dict, classes: object) -> dict:
    """The part of a fingerprint config.json's settings (and classes.json) can tell: all but
    the images of each split."""
    out = {key: settings[group][key] for key, group in FINGERPRINT_SETTINGS.items()
           if key in settings.get(group, {})}
    if isinstance(classes, dict):
        out["classes"] = _classes_digest([classes[str(i)] for i in range(len(classes))])
    return out


OPTION_NAMES = {"samples": "the dataset's images", "classes": "the class list"}


def check_compatible(state: dict, fingerprint: dict) -> None:
    """Exit 2 naming what changed. Settings an older trainjob did not record are not checked."""
    saved = state.get("fingerprint", {})
    changed = sorted(k for k in fingerprint if k in saved and saved[k] != fingerprint[k])
    if changed:
        names = ", ".join(OPTION_NAMES.get(k, "--" + k.replace("_", "-")) for k in changed)
        raise ConfigError(f"cannot resume: {names} changed since the run started; "
                          "rerun with the original settings, or pass --overwrite to start afresh")


def trim_logs(run: RunFolder, next_epoch: int) -> list[dict]:
    """Keep only epochs before ``next_epoch`` in the CSV and history, so each appears once."""
    history = [h for h in read_json(run.path(HISTORY), []) if h["epoch"] < next_epoch]
    write_json(run.path(HISTORY), history)
    csv_path = run.path(LOG_CSV)
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < next_epoch]
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows(keep if len(keep) > 1 else [])
    return history


def restore_weights(model: keras.Model, run: RunFolder, record: dict) -> int:
    """Load the weights and optimizer state of a save point; returns optimizer iterations.

    Call inside the strategy's scope: the optimizer's slots are built here, and under
    MirroredStrategy they must be mirrored variables like the model's."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(run.path(weights_of(record)))
    model._initial_epoch = None  # a stale value would override fit(initial_epoch=...)
    return int(model.optimizer.iterations.numpy())


def plain(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
