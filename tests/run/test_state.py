"""trainjob.run.state and trainjob.run.savepoints: save points as pairs under new names, the
fallback to an older pair, what goes to the store together. No TensorFlow: the loop's
weights are written by a plain function, as any training loop may."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.runs import weights_writer

from trainjob.errors import Preempted
from trainjob.run import savepoints
from trainjob.run.folder import HISTORY, STATUS, RunFolder, read_json, sha256, write_json
from trainjob.run.state import RunState
from trainjob.run.stop import StopSignal
from trainjob.store.local import LocalStore


@pytest.fixture
def folder(tmp_path):
    with RunFolder(tmp_path / "run", LocalStore(tmp_path / "out")) as run:
        yield run


def run_epochs(state: RunState, epochs: range) -> None:
    for epoch in epochs:
        state.end_epoch(epoch, {"epoch": epoch, "loss": 1.0 / (epoch + 1)},
                        write_weights=weights_writer(f"epoch {epoch}"), iterations=epoch + 1,
                        callbacks={"EarlyStopping:": {"wait": epoch}})


def pairs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "backup").glob("state-*"))


def test_each_epoch_writes_a_new_pair_and_the_store_keeps_two(folder, tmp_path):
    state = RunState(folder, fingerprint={"k": 1}, history=[], stop=StopSignal())
    for epoch in range(3):
        run_epochs(state, range(epoch, epoch + 1))
        assert folder.uploader.flush(timeout=10)
    expected = ["state-000002.json", "state-000002.weights.h5",
                "state-000003.json", "state-000003.weights.h5"]
    assert pairs(tmp_path / "run") == expected
    assert pairs(tmp_path / "out") == expected  # pruned only after pair 3 was stored
    out = tmp_path / "out"
    pointer = read_json(out / "backup/state.json")
    assert pointer["epoch"] == 3 and pointer["weights"] == "state-000003.weights.h5"
    assert pointer["weights_sha256"] == sha256(out / "backup/state-000003.weights.h5")
    assert read_json(out / STATUS)["epochs_done"] == 3
    assert [h["epoch"] for h in read_json(out / HISTORY)] == [0, 1, 2]


def test_a_resumed_run_continues_the_sequence(folder, tmp_path):
    state = RunState(folder, fingerprint={}, history=[], stop=StopSignal())
    run_epochs(state, range(2))
    record = savepoints.load_state(folder)
    assert folder.uploader.flush(timeout=10)
    again = RunState(folder, fingerprint={}, history=[], stop=StopSignal(),
                     restore=record)
    run_epochs(again, range(2, 3))
    assert folder.uploader.flush(timeout=10)
    assert savepoints.load_state(folder)["seq"] == 3
    # The store keeps the new pair and the one it resumed from, whatever was skipped.
    assert pairs(tmp_path / "out") == ["state-000002.json", "state-000002.weights.h5",
                                       "state-000003.json", "state-000003.weights.h5"]


def test_a_kill_while_saving_leaves_the_previous_pair_whole(folder):
    state = RunState(folder, fingerprint={}, history=[], stop=StopSignal())
    run_epochs(state, range(2))

    def killed(path: Path) -> None:
        path.write_bytes(b"half")
        raise KeyboardInterrupt  # what SIGKILL would interrupt: the new record is never written

    with pytest.raises(KeyboardInterrupt):
        state.end_epoch(2, {"epoch": 2}, write_weights=killed, iterations=3, callbacks={})
    record = savepoints.load_state(folder)
    assert record["epoch"] == 2 and record["seq"] == 2


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_broken_newest_pair_falls_back_to_the_previous(folder, damage, caplog):
    state = RunState(folder, fingerprint={}, history=[], stop=StopSignal())
    run_epochs(state, range(3))
    newest = folder.path("backup/state-000003.weights.h5")
    if damage == "corrupt":
        newest.write_bytes(b"another epoch's weights")
    else:
        newest.unlink()
    record = savepoints.load_state(folder)
    assert record["seq"] == 2 and record["epoch"] == 2
    assert "epoch 3 step 0 is unusable" in caplog.text


def test_the_single_pair_of_older_versions_still_loads(folder):
    weights = folder.path(savepoints.LEGACY_WEIGHTS)
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"legacy")
    write_json(folder.path(savepoints.STATE), {"epoch": 4, "step": 0, "weights_sha256": sha256(weights)})
    record = savepoints.load_state(folder)
    assert record["epoch"] == 4 and savepoints.weights_of(record) == savepoints.LEGACY_WEIGHTS


def test_no_usable_pair_falls_back_to_the_last_checkpoint(folder):
    assert savepoints.from_last_checkpoint(folder) is None
    write_json(folder.path(HISTORY), [{"epoch": 0}, {"epoch": 1}])
    folder.path("checkpoints").mkdir()
    folder.path("checkpoints/last.weights.h5").write_bytes(b"w")
    write_json(folder.path("config.json"), {"settings": {}, "fingerprint": {"seed": 42}})
    record = savepoints.from_last_checkpoint(folder)
    assert record["epoch"] == 2 and record["from_checkpoint"] == "checkpoints/last.weights.h5"
    assert record["fingerprint"] == {"seed": 42}  # checked like any resume (test_job.py)


def test_a_signal_stops_after_the_epoch_is_saved(folder):
    stop = StopSignal()
    state = RunState(folder, fingerprint={}, history=[], stop=stop)
    run_epochs(state, range(1))
    state.stop_if_requested("after epoch 0")  # no signal: nothing happens
    stop.requested_at = 0.0
    with pytest.raises(Preempted, match="after epoch 0"):
        state.stop_if_requested("after epoch 0")
    assert savepoints.load_state(folder)["epoch"] == 1


def test_a_lost_run_lock_stops_the_next_save(folder):
    class Lost(Exception):
        pass

    lost = []

    def fence() -> None:
        if lost:
            raise Lost()

    state = RunState(folder, fingerprint={}, history=[], stop=StopSignal(), fence=fence)
    run_epochs(state, range(1))
    lost.append(True)
    with pytest.raises(Lost):
        run_epochs(state, range(1, 2))
    assert savepoints.load_state(folder)["epoch"] == 1  # nothing written after the loss


def test_finish_training_marks_the_newest_pair(folder, tmp_path):
    state = RunState(folder, fingerprint={}, history=[], stop=StopSignal())
    run_epochs(state, range(2))
    state.finish_training()
    assert folder.uploader.flush(timeout=10)
    assert savepoints.load_state(folder)["finished_training"] is True
    assert read_json(tmp_path / "out/backup/state.json")["finished_training"] is True
    assert read_json(tmp_path / "out/backup/state-000002.json")["finished_training"] is True
