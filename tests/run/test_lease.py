"""The run lock's lease: a job writes the run only while its last successful heartbeat is
younger than half the stale time, and confirms the lock (a conditional write) right before
the records, the status, the manifest and any delete. A job cut off from the store, or
paused, for longer than the stale time writes nothing once another job has taken over.

Real S3 (moto over HTTP) with the fault proxy for the partition; the heartbeat thread is
slowed to once an hour, so that only the lease decides (a beat could otherwise notice the
take-over first, by luck of timing)."""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import SMALL, STAND_IN, start_trainjob
from helpers.checks import assert_complete_run
from helpers.faultproxy import FaultProxy
from helpers.jobs import hooks_file, stored_json, wait_for

from trainjob.errors import LostOwnership, StorageError
from trainjob.run import savepoints, stop
from trainjob.run.folder import LOCK, STATUS, RunFolder
from trainjob.run.lock import RunLock
from trainjob.run.state import RunState
from trainjob.store import client
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store

STALE = 2.0  # seconds: the lease is half of it
HOUR = 3600.0


def _writes(proxy: FaultProxy, since: float) -> list:
    """Requests through the proxy after ``since`` that created, replaced or deleted an
    object (not the parts of a multipart upload, nor its abort: no object changes then)."""
    def changes_an_object(method: str, path: str) -> bool:
        query = parse_qs(urlsplit(path).query, keep_blank_values=True)
        if method == "PUT":
            return "uploadId" not in query  # PutObject (or a copy), not UploadPart
        if method == "POST":
            return "uploadId" in query or "delete" in query  # Complete..., DeleteObjects
        return method == "DELETE" and "uploadId" not in query  # not AbortMultipartUpload

    return [s for s in proxy.seen if s.at >= since and 200 <= s.status < 300
            and changes_an_object(s.method, s.path)]


def test_a_job_cut_off_past_the_stale_time_writes_nothing_after_a_takeover(
        s3env, bucket, tmp_path, monkeypatch):
    with FaultProxy(s3env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        client._clients.clear()
        ours = S3Store(bucket, "run", threads=2)  # keeps its client: through the proxy
        lock = RunLock(ours, stale_after=STALE, heartbeat_every=HOUR)
        lock.acquire()
        with RunFolder(tmp_path / "local", ours, lease=lock) as run:
            run.set_status("running")
            assert run.uploader.flush(timeout=10)
            cut = time.time()
            proxy.fail_everything()  # the partition
            time.sleep(STALE + 0.5)  # the last beat is now older than the stale time

            monkeypatch.setenv("AWS_ENDPOINT_URL", s3env.endpoint)
            client._clients.clear()
            theirs = S3Store(bucket, "run", threads=2)
            taker = RunLock(theirs, stale_after=STALE, heartbeat_every=HOUR)
            taker.acquire(timeout=10, poll=0.05)
            theirs.write_json(STATUS, {"state": "running", "owner": "the new job"})

            proxy.recover()  # our network is back, with a status queued
            run.set_status("preempted")
            with pytest.raises(LostOwnership) as err:
                run.uploader.flush(timeout=20)
            assert "lost the run lock" in str(err.value)
            assert _writes(proxy, cut) == [], "the cut-off job wrote after the take-over"
            assert theirs.read_json(STATUS) == {"state": "running", "owner": "the new job"}
            assert theirs.read_json(LOCK)["token"] == taker.token
        taker.release()


def test_a_store_unreachable_past_the_lease_holds_writes_until_the_lock_is_confirmed(
        s3env, bucket, tmp_path, monkeypatch):
    """Without a take-over, an outage past the lease costs nothing: the writes wait (the
    uploader retries) and go once a conditional write has shown the lock is still ours."""
    with FaultProxy(s3env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        client._clients.clear()
        store = S3Store(bucket, "run", threads=2)
        lock = RunLock(store, stale_after=STALE, heartbeat_every=HOUR)
        lock.acquire()
        with RunFolder(tmp_path / "local", store, lease=lock) as run:
            run.uploader.backoff = 0.2
            proxy.fail_everything()
            time.sleep(STALE / 2 + 0.2)  # past the lease
            run.set_status("running", epoch=3)
            _until(lambda: run.uploader.error is not None)  # the put is held back...
            assert LOCK in str(run.uploader.error)  # ...by the lock's confirmation
            assert run.uploader.lost is None and not lock.lost.is_set()  # not a loss
            assert "run/status.json" not in s3env.keys(bucket, "run/")
            back = time.time()
            proxy.recover()
            assert run.uploader.flush(timeout=20)
        # The lock was confirmed (a conditional PUT of it) before the status went up.
        writes = [(s.method, s.path.rsplit("/", 1)[-1], "if-match" in s.headers)
                  for s in _writes(proxy, back)]
        assert writes.index(("PUT", LOCK, True)) < writes.index(("PUT", STATUS, False)), writes
        assert store.read_json(STATUS)["epoch"] == 3
        lock.release()


def test_a_paused_job_writing_a_local_output_stops_before_its_next_save(tmp_path):
    """A local --output is written by the job itself (Keras' callbacks, the save points):
    a job paused past the stale time, whose lock another job took meanwhile, must not write
    its next save point there."""
    out = tmp_path / "out"
    lock = RunLock(LocalStore(out), stale_after=STALE, heartbeat_every=HOUR)
    lock.acquire()
    with RunFolder(out, LocalStore(out), lease=lock) as run:
        state = RunState(run, fingerprint={}, history=[], stop=stop.StopSignal(),
                         fence=run.check)
        state.end_epoch(0, {"epoch": 0, "loss": 1.0}, write_weights=_weights(b"epoch 0"),
                        iterations=1, callbacks={})
        time.sleep(STALE + 0.2)  # the pause: no beat meanwhile
        taker = RunLock(LocalStore(out), stale_after=STALE, heartbeat_every=HOUR)
        taker.acquire(timeout=5, poll=0.05)
        with pytest.raises(LostOwnership):
            state.end_epoch(1, {"epoch": 1, "loss": 0.5}, write_weights=_weights(b"epoch 1"),
                            iterations=2, callbacks={})
        assert savepoints.load_state(run)["epoch"] == 1  # the save point of epoch 0, alone
        assert savepoints.saved_points(run) == [1]
        taker.release()


def _until(predicate, timeout: float = 180.0) -> None:
    """Wait for a state; the timeout only bounds a failure (30 s was once too short for
    70 MiB of held parts to reach the server and the upload's abort to follow, with the
    machine loaded 3x: a wait for a state must not assume a speed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _weights(data: bytes):
    return lambda path: path.write_bytes(data)


@pytest.mark.e2e
def test_a_job_partitioned_past_the_stale_time_writes_nothing_when_its_network_returns(
        s3, bucket, dataset, tmp_path):
    """Two real jobs on one output. The first is cut off from the store (every connection
    dropped) and trains on, its uploads queued; the second takes the stale lock over and
    runs to the end. When the first one's network comes back, nothing of it lands: it
    exits 6 with one line, and the second one's run is complete and valid."""
    prefix = "runs/partition"
    args = ["train", "--data", dataset, "--output", f"s3://{bucket}/{prefix}", "--epochs", "4",
            "--steps-per-epoch", "2", *SMALL]
    timings = {"lock_stale_seconds": 8, "lock_heartbeat_seconds": 1, **STAND_IN}
    release = tmp_path / "release"
    cut_log, new_log = tmp_path / "cut.log", tmp_path / "new.log"
    with FaultProxy(s3.endpoint) as proxy:
        hooks = hooks_file(tmp_path, "cut.json", **timings,
                       hold={"epoch:2": {"seconds": 600, "until_file": str(release)}})
        cut = start_trainjob(args, s3.env(AWS_ENDPOINT_URL=proxy.endpoint,
                                          TRAINJOB_TEST_HOOKS=hooks), tmp_path / "h1", cut_log)
        wait_for(lambda: stored_json(s3, bucket, prefix).get("epochs_done", 0) >= 1, cut, cut_log)
        since = time.time()
        proxy.cut_off()
        wait_for(lambda: "lock heartbeat failed" in cut_log.read_text(), cut, cut_log)
        new = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks_file(tmp_path, "new.json",
                                                                     **timings)),
                             tmp_path / "h2", new_log)
        wait_for(lambda: "taking over the run lock" in new_log.read_text(), new, new_log)
        # The cut-off job trained on meanwhile: its epochs 1 and 2 wait to be uploaded.
        wait_for(lambda: "test hook: holding at epoch:2" in cut_log.read_text(), cut, cut_log)
        proxy.recover()
        wait_for(lambda: "lost the run lock" in cut_log.read_text(), cut, cut_log)
        release.touch()
        assert cut.wait(timeout=120) == 6, cut_log.read_text()[-3000:]
        assert new.wait(timeout=600) == 0, new_log.read_text()[-3000:]
    assert _writes(proxy, since) == [], "the cut-off job wrote after the take-over"
    errors = [line for line in cut_log.read_text().splitlines()
              if line.startswith("trainjob: error")]
    assert len(errors) == 1 and "lost the run lock" in errors[0], errors
    assert "resuming at epoch 1, batch 0" in new_log.read_text()
    assert_complete_run(s3, bucket, prefix, epochs=4)


def test_an_upload_still_running_when_the_lease_runs_out_is_never_completed(
        through_proxy, s3env, bucket, tmp_path):
    """A large upload (multipart) begun inside the lease whose parts are still on their way
    at the deadline is cancelled: its multipart upload is never completed, so no object
    appears, even when the parts get through afterwards."""
    proxy = through_proxy()
    big = tmp_path / "state-000007.weights.h5"
    big.write_bytes(os.urandom(70 * 2**20))  # over the 64 MiB multipart threshold
    proxy.hold(r"^PUT /[^/]+/run/backup/")  # the parts wait in the proxy
    store = S3Store(bucket, "run", threads=2)
    deadline = time.monotonic() + 1.0
    with pytest.raises(StorageError) as err:
        store.put(big, "backup/state-000007.weights.h5", until=lambda: deadline)
    assert "lease ran out" in str(err.value)
    proxy.release()  # the held parts reach the server now, after the deadline
    _until(lambda: any(s.method == "DELETE" for s in proxy.seen))  # the upload is aborted
    assert not any(s.method == "POST" and "uploadId" in s.path for s in proxy.seen)
    assert "run/backup/state-000007.weights.h5" not in s3env.keys(bucket, "run/")
