"""trainjob.train.eventlog: TensorBoard event files rewritten from the epoch records, each epoch's
step exactly once across a kill and a resume, and sent in the epoch's generation."""

from __future__ import annotations

import pytest
from helpers.checks import assert_each_step_once
from helpers.runs import weights_writer

from trainjob.run import savepoints, stop
from trainjob.run.folder import RunFolder, read_json
from trainjob.run.state import RunState
from trainjob.store.local import LocalStore
from trainjob.train import eventlog


def row(epoch: int, **extra: float) -> dict:
    return {"epoch": epoch, "loss": 1.0 / (epoch + 1), "accuracy": 0.1 * epoch,
            "val_loss": 2.0 / (epoch + 1), "val_accuracy": 0.05 * epoch,
            "learning_rate": 1e-3, "seconds": 3.0, "iterations": 6 * (epoch + 1),
            "phase": "full", **extra}


def test_split_scalars_names_tags_like_the_keras_callback():
    split = eventlog.split_scalars(row(2))
    assert split[eventlog.TRAIN] == {"epoch_loss": pytest.approx(1 / 3),
                                     "epoch_accuracy": pytest.approx(0.2),
                                     "epoch_learning_rate": 1e-3}
    assert split[eventlog.VALIDATION] == {"epoch_loss": pytest.approx(2 / 3),
                                          "epoch_accuracy": pytest.approx(0.1)}


def end_epochs(state: RunState, epochs: range, **extra: float) -> None:
    for epoch in epochs:
        state.end_epoch(epoch, row(epoch, **extra), write_weights=weights_writer(str(epoch)),
                        iterations=epoch + 1, callbacks={})


def test_kill_and_resume_leave_each_epoch_once_locally_and_in_the_store(tmp_path):
    local, out = tmp_path / "run", tmp_path / "out"
    with RunFolder(local, LocalStore(out)) as run:
        first = RunState(run, fingerprint={}, history=[], stop=stop.StopSignal())
        first.add_epoch_writer(lambda h: eventlog.write_events(h, local))
        assert not (local / eventlog.TRAIN).exists()  # nothing to write yet
        end_epochs(first, range(4), marker=1.0)  # then "killed" with epochs 0-3 written
        assert run.uploader.flush(timeout=10)
        assert_each_step_once(out, 4)  # the epoch's generation carried the events

        # Resumed from the save point of epoch 2: the history is trimmed to epochs 0-1 and
        # the event files follow it at once; epochs 2 and 3 are trained again.
        history = savepoints.trim_logs(run, 2)
        second = RunState(run, fingerprint={}, history=history, stop=stop.StopSignal(),
                          restore=read_json(local / savepoints.STATE))
        second.add_epoch_writer(lambda h: eventlog.write_events(h, local))
        assert_each_step_once(local, 2)
        end_epochs(second, range(2, 4), marker=2.0)
        assert run.uploader.flush(timeout=10)
    for folder in (local, out):
        train = assert_each_step_once(folder, 4)
        # Epochs 2-3 are the second process's values, 0-1 the first's.
        assert [v for _, v in sorted(train["epoch_marker"])] == [1.0, 1.0, 2.0, 2.0]
    assert sorted(p.name for p in (local / "tensorboard").rglob("*") if p.is_file()) == \
        [eventlog.FILE_NAME] * 2  # no staging folder or second file left behind


def test_a_history_without_validation_removes_the_validation_file(tmp_path):
    eventlog.write_events([row(0)], tmp_path)
    assert (tmp_path / eventlog.VALIDATION).exists()
    written = eventlog.write_events([{"epoch": 0, "loss": 1.0}], tmp_path)
    assert written == [eventlog.TRAIN]
    assert not (tmp_path / eventlog.VALIDATION).exists()


@pytest.mark.training
def test_tensorboard_option_writes_events_from_a_real_fit_with_iterations_recorded(tmp_path):
    """make_callbacks with --tensorboard, a tiny model's fit: each epoch's events are on
    disk, and each history row carries the optimizer's step count."""
    import keras
    import numpy as np

    from trainjob.config import Config
    from trainjob.train import callbacks as cb

    cfg = Config.from_options(data="/d", output="/o", tensorboard=True)
    with RunFolder(tmp_path / "run", LocalStore(tmp_path / "run")) as run:
        state = RunState(run, fingerprint={}, history=[], stop=stop.StopSignal())
        keeper = cb.RunKeeper(state, steps_per_epoch=4)
        callbacks = cb.make_callbacks(cfg, run, keeper)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        x = np.eye(4, dtype="float32")[np.arange(16) % 4]
        y = keras.utils.to_categorical(np.arange(16) % 3, 3)
        model.fit(x, y, batch_size=4, epochs=3, validation_data=(x, y), callbacks=callbacks,
                  verbose=0)
    assert [h["iterations"] for h in state.history] == [4, 8, 12]
    assert_each_step_once(tmp_path / "run", 3)


def test_runs_download_only_tensorboard_fetches_the_event_files(tmp_path, capsys):
    """A published run with events: `runs download --only tensorboard` brings those files
    alone, checked against the manifest, ready for `tensorboard --logdir`."""
    from trainjob.cli import main

    local, out = tmp_path / "run", tmp_path / "out"
    with RunFolder(local, LocalStore(out)) as run:
        run.write("history.json", [row(0), row(1)])
        run.write("metrics.json", {"accuracy": 0.5})
        eventlog.write_events([row(0), row(1)], local)
        manifest = run.publish(timeout=10)
    assert {eventlog.TRAIN, eventlog.VALIDATION} <= set(manifest["files"])
    rc = main(["runs", "download", str(out), str(tmp_path / "got"), "--only", "tensorboard"])
    assert rc == 0, capsys.readouterr().err
    got = sorted(p.relative_to(tmp_path / "got").as_posix()
                 for p in (tmp_path / "got").rglob("*") if p.is_file())
    assert got == sorted([eventlog.TRAIN, eventlog.VALIDATION])
    assert_each_step_once(tmp_path / "got", 2)
