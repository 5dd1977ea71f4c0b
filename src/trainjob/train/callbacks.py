"""trainjob's Keras callbacks: the standard set, plus RunKeeper, which connects Keras' fit
to ``runstate.RunState`` (save points, epoch records, upload generations, stop checks).

Keras' BackupAndRestore restores weights and the epoch but forgets EarlyStopping,
ReduceLROnPlateau and ModelCheckpoint state, and deletes its folder on success. RunKeeper
saves all of it under ``backup/`` (never ``checkpoints/``) and puts it back on restart.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
from keras.src.saving import saving_lib  # weights without optimizer state

from trainjob.config import Config
from trainjob.errors import TrainingError
from trainjob.hooks import hold, read_hooks
from trainjob.run.folder import BEST, BEST_STAGED, LAST, LOG_CSV, RunFolder
from trainjob.run.savepoints import CALLBACK_STATE, plain
from trainjob.run.state import RunState

log = logging.getLogger(__name__)


def exp_decay(base_lr: float, fine_tune_lr: float | None = None, from_epoch: int = 0):
    """The reference script's scheduler: base rate until epoch 10, then exponential decay.
    From epoch ``from_epoch`` (the backbone unfrozen) the base is ``fine_tune_lr``."""

    def schedule(epoch: int, lr: float) -> float:
        base = fine_tune_lr if fine_tune_lr is not None and epoch >= from_epoch else base_lr
        return base if epoch < 10 else base * math.exp(0.1 * (10 - epoch))

    return schedule


class WeightsCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint of the model's weights without the optimizer state: a third of the
    size (~94 MB instead of ~283 MB for ResNet50 with Adam), so each epoch uploads less.
    The resume state under backup/ is what carries the optimizer. ``label`` names it in
    the saved callback state (the local path differs from pod to pod)."""

    def __init__(self, filepath: str, label: str, **kwargs: Any) -> None:
        super().__init__(filepath, save_weights_only=True, **kwargs)
        self.label = label

    def _save_model(self, epoch: int, batch: int | None, logs: dict) -> None:
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            save_model_weights(self.model, Path(filepath))


def load_model_weights(model: keras.Model, path: Path) -> None:
    """Load a WeightsCheckpoint file into a compiled model, leaving its optimizer alone."""
    saving_lib.load_weights_only(model, str(path), objects_to_skip=[model.optimizer])


def save_model_weights(model: keras.Model, path: Path) -> None:
    """Write a file in WeightsCheckpoint's format (weights without the optimizer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saving_lib.save_weights_only(model, str(path), objects_to_skip=[model.optimizer])


def make_callbacks(cfg: Config, run: RunFolder, keeper: RunKeeper) -> list[keras.callbacks.Callback]:
    c = cfg.callbacks
    callbacks: list[keras.callbacks.Callback] = [
        # First: for a local --output, the callbacks below write into the output itself, so
        # a job that lost the run lock must stop before they run.
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: keeper.state.check()),
        *([ScriptedMetrics(hooks["metrics"])] if "metrics" in (hooks := test_hooks()) else []),
        # A new best goes to a staging name; RunState moves it into place once its
        # epoch's save point is recorded, so it never runs ahead of the resume point.
        WeightsCheckpoint(str(run.path(BEST_STAGED)), "best", monitor=c.checkpoint_monitor,
                          mode=c.checkpoint_mode, save_best_only=True),
        WeightsCheckpoint(str(run.path(LAST)), "last"),
        keras.callbacks.CSVLogger(str(run.path(LOG_CSV)), append=True),
    ]
    if c.early_stopping_patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=c.early_stopping_monitor, patience=c.early_stopping_patience,
            min_delta=c.early_stopping_min_delta, mode=c.early_stopping_mode))
    if cfg.optim.lr_schedule == "exp-decay":
        o = cfg.optim
        fine_tune = o.fine_tune_rate if o.freeze_backbone_epochs else None
        callbacks.append(keras.callbacks.LearningRateScheduler(
            exp_decay(o.learning_rate, fine_tune, o.freeze_backbone_epochs)))
    elif c.reduce_lr:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=c.reduce_lr_monitor, mode=c.reduce_lr_mode, factor=c.reduce_lr_factor,
            patience=c.reduce_lr_patience,
            min_delta=c.reduce_lr_min_delta, cooldown=c.reduce_lr_cooldown, min_lr=c.reduce_lr_min_lr,
            verbose=1))
    if cfg.output.tensorboard:
        from trainjob.train import eventlog

        keeper.state.add_epoch_writer(lambda history: eventlog.write_events(history, run.local))
    # Last: it must see every other callback's state after the epoch (DESIGN: BackupAndRestore
    # goes last for the same reason).
    callbacks.append(keeper)
    keeper.set_peers(callbacks)
    run.path(BEST).parent.mkdir(parents=True, exist_ok=True)
    return callbacks


class StartClock:
    """This process's first training step, in two parts for config.json: ``tracing``, the
    step's Python, which runs only while TensorFlow builds the step's graph, and
    ``first_step``, the rest (the first batch from the input pipeline, the graph's
    optimization, the step itself). ``report`` gets both once."""

    def __init__(self) -> None:
        self.report: Callable[[dict[str, float]], None] | None = None
        self.tracing = 0.0
        self._began: float | None = None
        self._done = False

    def traced(self, step: Callable) -> Callable:
        """``step`` timed whenever it runs as Python: while it is traced."""
        @functools.wraps(step)
        def timed_step(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return step(*args, **kwargs)
            finally:
                self.tracing += time.monotonic() - started
        return timed_step

    def begin(self) -> None:
        if self._began is None:
            self._began = time.monotonic()

    def first_step_done(self) -> None:
        if self._done or self._began is None:
            return
        self._done = True
        took = time.monotonic() - self._began
        if self.report:
            self.report({"tracing": self.tracing, "first_step": max(0.0, took - self.tracing)})


class RunKeeper(keras.callbacks.Callback):
    """Last in the callback list: Keras' side of ``RunState``. It restores callback state,
    records each epoch and mid-epoch resume points, stops on a signal or a lost run lock,
    and fails fast on a NaN loss, without recording a partial epoch."""

    def __init__(self, state: RunState, *, steps_per_epoch: int,
                 backup_every_steps: int = 0) -> None:
        super().__init__()
        self.state = state
        self.backup_every_steps = backup_every_steps
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.step_offset = 0  # batches skipped at the start of a mid-epoch resume
        self._epoch_started = time.monotonic()
        self._tracked: dict[str, keras.callbacks.Callback] = {}
        self._hooks = test_hooks()  # read once: the batch end is a hot path
        self._first_step = True
        self.clock = StartClock()

    @property
    def history(self) -> list[dict]:
        return self.state.history

    def set_peers(self, callbacks: list[keras.callbacks.Callback]) -> None:
        """The callbacks whose state is saved, keyed by kind (and label, for checkpoints)."""
        self._tracked = {}
        for cb in callbacks:
            for kind in CALLBACK_STATE:
                if kind in (c.__name__ for c in type(cb).__mro__):
                    self._tracked[f"{kind}:{getattr(cb, 'label', '')}"] = cb

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.clock.begin()
        restore = self.state.restore
        if not restore:
            return
        saved = {checkpoint_key(key): value
                 for key, value in restore.get("callbacks", {}).items()}
        for key, cb in self._tracked.items():
            base = key.split(":")[0]
            for attr, value in saved.get(key, {}).items():
                if attr in CALLBACK_STATE[base]:
                    setattr(cb, attr, value)
        log.info("restored callback state: %s", restore.get("callbacks"))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        self._epoch_started = time.monotonic()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._first_step and "hold" in self._hooks:
            hold("first_step")  # a first step that traces for longer than the grace period
        self._first_step = False

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.clock.first_step_done()
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingError(f"loss became {float(loss)} at epoch {self.epoch} batch {batch}: "
                                "lower --learning-rate or check the data")
        if delay := self._hooks.get("sleep_after_batch"):
            time.sleep(float(delay))  # a stand-in backbone's step, as long as ResNet50's
        step = self.step_offset + batch + 1  # batches of this epoch done, across a restart
        if "hold" in self._hooks:
            hold(f"batch:{self.epoch}:{step}", lambda: self.state.stop.signalled)
        self.state.check()
        every = self.backup_every_steps
        if self.state.stop.requested or (every and step % every == 0):
            # A mid-epoch resume point: weights, optimizer, and where we are. Not after the
            # last batch: the epoch-end state follows, with validation and the CSV row.
            if every and step < self.steps_per_epoch:
                self.state.save_point(epoch=self.epoch, step=step, **self._snapshot())
            self.state.stop_if_requested(f"in epoch {self.epoch} after batch {step}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.step_offset = 0
        logs = dict(logs or {})
        opt = self.model.optimizer
        row = {"epoch": epoch, **{k: float(v) for k, v in logs.items()},
               "learning_rate": float(keras.ops.convert_to_numpy(opt.learning_rate)),
               # The optimizer's step count, kept once backup/ is gone (model.keras has no
               # optimizer): a resumed run continues it.
               "iterations": int(keras.ops.convert_to_numpy(opt.iterations)),
               "seconds": round(time.monotonic() - self._epoch_started, 3),
               "finished_at": round(time.time(), 3)}
        self.state.end_epoch(epoch, row, **self._snapshot())
        if "hold" in self._hooks:
            hold(f"epoch:{epoch}", lambda: self.state.stop.signalled)
        # A signal during validation, or this last epoch: the state above is complete.
        self.state.stop_if_requested(f"after epoch {epoch}")

    def _snapshot(self) -> dict[str, Any]:
        """What a save point records besides the epoch and step."""
        return {
            # save_weights includes the optimizer: iterations, moments, learning rate.
            "write_weights": lambda path: self.model.save_weights(path),
            "iterations": int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)),
            "callbacks": {key: {a: plain(getattr(cb, a, None))
                                for a in CALLBACK_STATE[key.split(":")[0]]}
                          for key, cb in self._tracked.items()},
        }


def checkpoint_key(key: str) -> str:
    """A saved callback's key as this version names it: trainjob <= 0.1 keyed checkpoints
    by their local path ("ModelCheckpoint:/.../checkpoints/best.weights.h5")."""
    kind, _, rest = key.partition(":")
    for label in ("best", "last"):
        if rest.endswith(f"/{label}.weights.h5"):
            return f"{kind}:{label}"
    return key


def test_hooks() -> dict:
    """Test-only behaviour (scripted metrics, holds, a step's pace); inert when unset."""
    return read_hooks()


class ScriptedMetrics(keras.callbacks.Callback):
    """Test hook: adds ``name: values[epoch]`` to the epoch logs before other callbacks."""

    def __init__(self, metrics: dict[str, list[float]]) -> None:
        super().__init__()
        self.metrics = metrics

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            for name, values in self.metrics.items():
                logs[name] = float(values[min(epoch, len(values) - 1)])
