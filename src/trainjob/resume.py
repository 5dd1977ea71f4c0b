"""Resume state under ``backup/``: reading it back, checking it, trimming the logs to it;
and the stop signal. ``callbacks.RunKeeper`` writes the state; nothing here imports TF."""

from __future__ import annotations

import csv
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from trainjob.artifacts import BACKUP, HISTORY, LOG_CSV, RunFolder, read_json, sha256
from trainjob.errors import ConfigError, Preempted

if TYPE_CHECKING:  # TensorFlow stays unimported until training starts
    import keras

log = logging.getLogger(__name__)

STATE = f"{BACKUP}/state.json"
WEIGHTS = f"{BACKUP}/state.weights.h5"
# Callback attributes Keras resets in on_train_begin and never saves.
CALLBACK_STATE = {
    "EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}


class StopSignal:
    """SIGTERM/SIGINT: the first asks training to stop at the next batch end, the second exits."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.in_training = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested_at is not None:
            os._exit(Preempted.exit_code)  # second signal: stop now, whatever is in flight
        self.requested_at = time.monotonic()
        log.warning("%s received: stopping after the current batch",
                    signal.Signals(signum).name)
        if not self.in_training:
            raise Preempted(f"stopped by {signal.Signals(signum).name} before training")

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def remaining(self, grace: float) -> float:
        if self.requested_at is None:
            return grace
        return max(0.0, grace - (time.monotonic() - self.requested_at))


def load_state(run: RunFolder) -> dict | None:
    """The saved resume state, if its weights file is intact."""
    state = read_json(run.path(STATE))
    weights = run.path(WEIGHTS)
    if not state or not weights.is_file():
        return None
    if sha256(weights) != state.get("weights_sha256"):
        log.warning("resume weights do not match %s; ignoring the resume state", STATE)
        return None
    return state


def check_compatible(state: dict, fingerprint: dict) -> None:
    saved = state.get("fingerprint", {})
    changed = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
    if changed:
        raise ConfigError(f"cannot resume: {', '.join(changed)} changed since the run started; "
                          "rerun with the original settings, or pass --overwrite to start afresh")


def trim_logs(run: RunFolder, next_epoch: int) -> list[dict]:
    """Keep only epochs before ``next_epoch`` in the CSV and history, so each appears once."""
    history = [h for h in read_json(run.path(HISTORY), []) if h["epoch"] < next_epoch]
    csv_path = run.path(LOG_CSV)
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < next_epoch]
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows(keep if len(keep) > 1 else [])
    return history


def restore_weights(model: keras.Model, run: RunFolder) -> int:
    """Load weights and optimizer state saved by RunKeeper; returns optimizer iterations."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(run.path(WEIGHTS))
    model._initial_epoch = None  # a stale value would override fit(initial_epoch=...)
    return int(model.optimizer.iterations.numpy())


def plain(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

