"""A generation's files go up in an order that a kill between any two of them cannot turn
into a wrong run: the resume weights, the logs that describe the save point, the record
and the pointer that make it the resume point, the best checkpoint, the status. Resumed
after a kill anywhere, the history holds each epoch exactly once, and the best
checkpoint never describes an epoch that the resumed run trains again.

Each case stores two epochs, then lets the third epoch's generation go up through the
fault proxy until the chosen file, whose PUT is held and then dropped: what the bucket
holds is what a SIGKILL at that moment leaves. A new pod then resumes from the bucket
through job._prepare, as the job does. No TensorFlow: weights are labelled bytes."""

from __future__ import annotations

import csv
import io
import time

import pytest
from helpers.runs import cfg_for

from trainjob.run import resumption, savepoints, stop
from trainjob.run.folder import BEST, BEST_STAGED, HISTORY, LOG_CSV, RunFolder
from trainjob.run.state import RunState
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store

# The files of an epoch's generation, in the order they must go up (as regexes of keys).
GENERATION = {
    "resume weights": r"backup/state-\d+\.weights\.h5",
    "CSV log": r"training_log\.csv",
    "history": r"history\.json",
    "record": r"backup/state-\d+\.json",
    "pointer": r"backup/state\.json",
    "best checkpoint": r"checkpoints/best\.weights\.h5",
    "status": r"status\.json",
}


def train_epoch(state: RunState, run: RunFolder, epoch: int) -> None:
    """What Keras' callbacks and RunKeeper do at an epoch end: the CSV row, a new best
    (every epoch improves here), then the save point and its generation."""
    with open(run.path(LOG_CSV), "a", newline="") as f:
        if epoch == 0:
            f.write("epoch,loss\n")
        f.write(f"{epoch},{1.0 / (epoch + 1)}\n")
    run.path(BEST_STAGED).parent.mkdir(parents=True, exist_ok=True)
    run.path(BEST_STAGED).write_bytes(f"best of epoch {epoch}".encode())
    state.end_epoch(epoch, {"epoch": epoch, "loss": 1.0 / (epoch + 1)},
                    write_weights=lambda p: p.write_bytes(f"weights of epoch {epoch}".encode()),
                    iterations=epoch + 1, callbacks={})


@pytest.mark.parametrize("cut_before", list(GENERATION))
def test_a_kill_before_any_file_of_a_generation_resumes_with_each_epoch_once(
        cut_before, through_proxy, bucket, tmp_path):
    proxy = through_proxy()
    store = S3Store(bucket, "run", threads=2)
    with RunFolder(tmp_path / "first", store) as run:
        state = RunState(run, fingerprint={}, history=[], stop=stop.StopSignal())
        for epoch in (0, 1):
            train_epoch(state, run, epoch)
        assert run.uploader.flush(timeout=30)
        proxy.hold(rf"^PUT /{bucket}/run/{GENERATION[cut_before]}$")
        train_epoch(state, run, 2)
        deadline = time.monotonic() + 30
        while not proxy.holding.is_set():
            assert time.monotonic() < deadline, "the generation never reached " + cut_before
            time.sleep(0.02)
        run.uploader.close(timeout=0.5)  # the process dies here
    proxy.release(drop=True)

    # A new pod: an empty local folder, the bucket as it was left.
    with RunFolder(tmp_path / "second", S3Store(bucket, "run", threads=2)) as again:
        point = resumption.prepare(cfg_for(f"s3://{bucket}/run", tmp_path), again)
        resumed_at = point["epoch"]
        history = savepoints.trim_logs(again, resumed_at)
        assert [h["epoch"] for h in history] == list(range(resumed_at)), cut_before
        rows = list(csv.DictReader(io.StringIO(again.path(LOG_CSV).read_text())))
        assert [int(r["epoch"]) for r in rows] == list(range(resumed_at)), cut_before
        assert [h["epoch"] for h in read_history(again)] == list(range(resumed_at))
        assert epoch_of(again.path(BEST)) < resumed_at, cut_before
        # Where the best's upload had not finished, the save point knows what it wants, and
        # its own weights are that best's: the resumed run writes them again.
        assert point["best"]["epoch"] == resumed_at - 1
        RunState(again, fingerprint={}, history=history, stop=stop.StopSignal(),
                 restore=point).reconcile_best(
            lambda path: path.write_bytes(f"best of epoch {resumed_at - 1}".encode()))
        assert epoch_of(again.path(BEST)) == resumed_at - 1, cut_before
    assert resumed_at == (2 if cut_before in ("resume weights", "CSV log", "history", "record")
                          else 3)


def read_history(run: RunFolder) -> list[dict]:
    import json

    return json.loads(run.path(HISTORY).read_text())


def epoch_of(path) -> int:
    """The epoch a labelled weights file of these tests was written in."""
    return int(path.read_bytes().decode().rsplit(" ", 1)[1])


def test_a_best_checkpoint_lost_with_a_skipped_generation_starts_again(tmp_path):
    """When the save point's best epoch is not the one it ends (the generation that carried
    that best was merged into a later one, whose upload was cut), those weights are gone:
    the best checkpoint and ModelCheckpoint's state start again, never a stale pairing."""
    out = tmp_path / "out"
    with RunFolder(out, LocalStore(out)) as run:
        run.path(BEST).parent.mkdir(parents=True)
        run.path(BEST).write_bytes(b"best of epoch 1")
        point = {"epoch": 5, "step": 0, "best": {"sha256": "0" * 64, "epoch": 3},
                 "callbacks": {"ModelCheckpoint:best": {"best": 0.1},
                               "EarlyStopping:": {"wait": 1}}}
        state = RunState(run, fingerprint={}, history=[], stop=stop.StopSignal(),
                         restore=point)
        state.reconcile_best(lambda path: pytest.fail("these are not the best's weights"))
        assert not run.path(BEST).exists()
        assert state.best is None
        assert state.restore["callbacks"] == {"EarlyStopping:": {"wait": 1}}


def test_without_sync_the_stored_resume_state_is_whole_or_absent(s3env, bucket, tmp_path):
    """--no-sync stores nothing of the resume state while training, and all of it once
    training is over (a failure after that, in the evaluation or the upload, resumes
    there): never a record whose weights were not stored, which a new pod refused with
    exit 2, for good."""
    with RunFolder(tmp_path / "first", S3Store(bucket, "run", threads=2), sync=False) as run:
        state = RunState(run, fingerprint={}, history=[], stop=stop.StopSignal())
        for epoch in (0, 1):
            train_epoch(state, run, epoch)
        assert run.uploader.flush(timeout=30)
        assert not any("/backup/" in key for key in s3env.keys(bucket, "run/"))  # absent
        state.finish_training()
        assert run.uploader.flush(timeout=30)
    with RunFolder(tmp_path / "second", S3Store(bucket, "run", threads=2)) as again:
        point = resumption.prepare(cfg_for(f"s3://{bucket}/run", tmp_path), again)  # whole
        assert point["finished_training"] and point["epoch"] == 2
        assert epoch_of(again.path(savepoints.weights_of(point))) == 1
        assert epoch_of(again.path(BEST)) == 1
