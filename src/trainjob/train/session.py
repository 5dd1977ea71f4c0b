"""One run inside TensorFlow, in the order ``job.py`` calls it: the strategy, the data
streams, the model (restored from the save point) and the callbacks (``Session.start``);
training, phase by phase (``fit``); the final model's evaluation (``evaluate``); the files a
finished run adds (``write_final_files``). A worker that is not the chief stops after
``fit`` (``leave``).

Importing this module imports TensorFlow: ``job.py`` does so only once the data is checked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from trainjob.config import Config
from trainjob.data.catalog import Dataset
from trainjob.errors import ConfigError
from trainjob.hooks import hold
from trainjob.run import phases, savepoints, startpoint
from trainjob.run.cluster import Cluster
from trainjob.run.folder import BEST, LAST, METRICS, MODEL, PLOT, RunFolder
from trainjob.run.state import RunState
from trainjob.run.stop import StopSignal
from trainjob.train import callbacks as callbacks_lib
from trainjob.train import collective, evaluation, exports, plots, steploop, trainer
from trainjob.train import streams as streams_lib
from trainjob.train.model import backbone_of, build_model
from trainjob.train.weights import InitialWeights

log = logging.getLogger(__name__)

Timer = Callable[[str], object]  # configfile.RunRecord.timed


@dataclass
class Session:
    """A run's TensorFlow side, built by ``start``. ``cfg`` has the learning rates scaled
    to the replicas (``--lr-scaling``); ``settings`` is the configuration as given."""

    cfg: Config
    settings: Config
    run_dir: RunFolder
    data: Dataset
    state: dict | None
    stop: StopSignal
    group: Cluster | None
    strategy: tf.distribute.Strategy
    replicas: int
    streams: streams_lib.Streams
    model: keras.Model
    run_state: RunState
    keeper: callbacks_lib.RunKeeper
    callbacks: list

    @classmethod
    def start(cls, cfg: Config, run_dir: RunFolder, data: Dataset, state: dict | None,
              initial: InitialWeights | None, stop: StopSignal, group: Cluster | None,
              fingerprint: dict, timed: Timer) -> Session:
        """Strategy, streams, model, restore, callbacks: everything before the first step."""
        # Before any TensorFlow op (collectives are configured at start-up), and after the
        # data, so that peers that fetch it slower are not timed out meanwhile.
        if group:  # from the save point the chief names; the chief alone after training
            strategy, state, replicas = collective.join(cfg, group, run_dir, state, stop,
                                                        fingerprint)
        else:
            strategy = trainer.make_strategy()
            replicas = strategy.num_replicas_in_sync
        if cfg.optim.batch_size % replicas:
            raise ConfigError(f"--batch-size {cfg.optim.batch_size} is the global batch: it "
                              f"must divide evenly among the {replicas} replicas")
        streams_lib.check_resume(data, state, group)
        settings, cfg = cfg, trainer.scale_learning_rates(cfg, replicas)
        with timed("pipeline"):
            streams = streams_lib.build(cfg, data, replicas, group)
        num_classes = len(data.classes)
        with strategy.scope():
            model = build_model(cfg.model, num_classes, initial)
            trainer.compile_model(model, cfg, num_classes)
            # Inside the scope: the optimizer's slots must be the strategy's variables too.
            if state:
                _restore(model, run_dir, state)
        if group:  # every worker starts alike, or none does
            collective.check_start(strategy, group, model, state, cfg.cluster.collective_timeout)
        history = savepoints.trim_logs(run_dir, state["epoch"]) if state else []
        run_state = RunState(run_dir, fingerprint=fingerprint, history=history, stop=stop,
                             restore=state, fence=run_dir.check,
                             workers=group.size if group else 1)
        if state and not state.get("from_checkpoint"):
            run_state.reconcile_best(functools.partial(callbacks_lib.save_model_weights, model))
        keeper = callbacks_lib.RunKeeper(run_state, steps_per_epoch=streams.steps,
                                         backup_every_steps=cfg.output.backup_every_steps)
        callbacks = callbacks_lib.make_callbacks(cfg, run_dir, keeper)
        if not group:  # Keras traces train_step; the step loop its replica step (fit)
            model.train_step = keeper.clock.traced(model.train_step)
        return cls(cfg, settings, run_dir, data, state, stop, group, strategy, replicas,
                   streams, model, run_state, keeper, callbacks)

    @property
    def publishes(self) -> bool:
        """Whether this process evaluates and publishes the run (not another worker)."""
        return self.group is None or self.group.is_chief

    def fit(self) -> None:
        """Train the epochs left, phase by phase (fine-tuning), unless training is over."""
        if self.state and self.state.get("finished_training"):
            return
        cfg, model, group, state = self.cfg, self.model, self.group, self.state
        num_classes = len(self.data.classes)
        fit = functools.partial(
            steploop.fit if group else trainer.fit, model, val_ds=self.streams.val, cfg=cfg,
            callbacks=self.callbacks,
            weights=trainer.class_weights(self.data.train_class_counts(),
                                          cfg.optim.class_weight),
            **({"strategy": self.strategy, "cluster": group, "stop": self.stop,
                "traced": self.keeper.clock.traced}
               if group else {}))
        self.stop.in_training = True
        try:
            freeze = cfg.optim.freeze_backbone_epochs
            previous = phases.phase_of_record(state, freeze)
            for part in phases.plan(state["epoch"] if state else 0,
                                    state.get("step", 0) if state else 0, freeze,
                                    cfg.optim.epochs):
                if model.stop_training:  # EarlyStopping ends the run, in either phase
                    break
                with self.strategy.scope():
                    trainer.enter_phase(model, cfg, num_classes, part.phase,
                                        phases.entry_rate(part.phase, previous, cfg.optim))
                self.run_state.begin_phase(previous := part.phase)
                self.keeper.step_offset = part.skip  # a mid-epoch restart: batches done
                with self.streams.reported():  # a damaged shard: exit 4, naming it
                    fit(self.streams.train(part.start, part.end, part.skip),
                        steps=self.streams.steps - part.skip, initial_epoch=part.start,
                        epochs=part.end)
        finally:
            self.stop.in_training = False
            self.stop.end_collective()
        self.run_state.stop_if_requested("at the end of training")
        self.run_state.finish_training()
        hold("after_training")

    def leave(self) -> None:
        """Several workers, after training: each records its weights' digests (a private
        file); one that is not the chief leaves once the bucket says training is over."""
        trainer.record_weights(self.model, Path(self.cfg.runtime.work_dir) /
                               "worker-weights.json", worker=self.group.index,
                               epochs=len(self.keeper.history))
        if not self.publishes:
            startpoint.wait_until_finished(self.run_dir.store, self.cfg.output.upload_timeout,
                                           self.group.index)
            log.info("worker %d: training done; the chief evaluates and publishes",
                     self.group.index)

    def evaluate(self, timed: Timer) -> dict:
        """The final model (the best checkpoint's weights, its BatchNorm statistics
        recomputed) on the test split: metrics.json and its pictures."""
        cfg, model, run_dir = self.cfg, self.model, self.run_dir
        if cfg.callbacks.restore_best and run_dir.path(BEST).exists():
            callbacks_lib.load_model_weights(model, run_dir.path(BEST))
            log.info("restored the best weights (%s) for the final model",
                     cfg.callbacks.checkpoint_monitor)
        if cfg.callbacks.recalibrate_batchnorm:  # the batches BN normalized: per replica
            with timed("recalibrate_batchnorm"):
                batch = cfg.optim.batch_size // self.replicas
                with self.streams.reported():
                    evaluation.recalibrate_batchnorm(
                        model, self.streams.recalibration(batch),
                        max_batches=max(1, evaluation.PRECISE_BN_IMAGES // batch))
        with self.streams.reported():
            metrics = evaluation.evaluate(model, self.streams.test(cfg.optim.batch_size),
                                          self.data.classes)
        run_dir.write(METRICS, metrics)
        log.info("test: %s", {k: v for k, v in metrics.items()
                              if not isinstance(v, (dict, list))})
        plots.plot_test_split(metrics, self.data.classes, run_dir.local)
        return metrics

    def write_final_files(self) -> None:
        """The final model (no optimizer state; a SavedModel on request) and the history's
        picture."""
        self.run_dir.path(MODEL).parent.mkdir(parents=True, exist_ok=True)
        backbone_of(self.model).trainable = True  # loads like any model, after any phase
        exports.write_model(self.model, self.run_dir.local, self.cfg.output.export)
        plots.plot_history(self.keeper.history, self.run_dir.path(PLOT))

    @property
    def epochs_done(self) -> int:
        return len(self.keeper.history)


def _restore(model: keras.Model, run_dir: RunFolder, state: dict) -> None:
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
