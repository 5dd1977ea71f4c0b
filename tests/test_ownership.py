"""A job whose run lock is taken over stops writing the run: the real job, on SeaweedFS.

The lock's own compare-and-swap and its races are tested in test_lock_processes.py with
small worker processes; here it is trainjob train itself that must go quiet and exit 6."""

from __future__ import annotations

import json
import time

import pytest

from conftest import SMALL, make_bucket, point_boto3_at, run_trainjob, start_trainjob
from test_e2e import assert_complete_run
from test_resume import _status, _wait_for
from trainjob import s3client
from trainjob.artifacts import LOCK
from trainjob.lock import RunLock
from trainjob.storage import S3Store

pytestmark = pytest.mark.e2e


def etags(server, bucket: str, prefix: str) -> dict[str, str]:
    """Every object of the run but the lock, with its ETag."""
    out = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(LOCK):
                out[obj["Key"]] = obj["ETag"]
    return out


def test_a_job_that_lost_its_lock_stops_writing_and_exits_6(seaweed, official_zip, tmp_path,
                                                           monkeypatch):
    bucket, prefix = make_bucket(seaweed), "runs/owned"
    seaweed.client().upload_file(str(official_zip), bucket, "data/caltech-101.zip")
    args = ["train", "--data", f"s3://{bucket}/data/caltech-101.zip",
            "--output", f"s3://{bucket}/{prefix}", "--epochs", "3", "--steps-per-epoch", "2",
            *SMALL]
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps({"lock_heartbeat_seconds": 1, "sleep_after_epoch": {"0": 15}}))
    log = tmp_path / "a.log"
    job_a = start_trainjob(args, seaweed.env(TRAINJOB_TEST_HOOKS=str(hooks)), tmp_path / "a", log)
    # status.json goes up last in a generation: epoch 0 is wholly in the bucket, and job A
    # is pausing after it.
    _wait_for(lambda: _status(seaweed, bucket, prefix).get("epochs_done", 0) >= 1, job_a, log)

    point_boto3_at(seaweed, monkeypatch, tmp_path)
    taker = RunLock(S3Store(bucket, prefix, threads=2))
    try:
        taker.acquire(force=True, timeout=10, poll=0.05)
        time.sleep(2.0)  # one heartbeat (1 s) and a margin: job A knows by now
        frozen = etags(seaweed, bucket, prefix)
        rc = job_a.wait(timeout=120)
        assert rc == 6, log.read_text()[-3000:]
        assert etags(seaweed, bucket, prefix) == frozen, "job A wrote after losing the lock"
        assert RunLock(S3Store(bucket, prefix)).store.read_json(LOCK)["token"] == taker.token
    finally:
        job_a.kill()
        taker.release()
        s3client._clients.clear()
    errors = [line for line in log.read_text().splitlines() if line.startswith("trainjob: error")]
    assert len(errors) == 1 and "lost the run lock" in errors[0], errors
    assert _status(seaweed, bucket, prefix)["state"] == "running"  # no "failed" written by A

    # The new owner (here: the same command again) continues the run and finishes it.
    result = run_trainjob(args, seaweed.env(), tmp_path / "b")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming at epoch 1, batch 0" in result.stdout
    assert_complete_run(seaweed, bucket, prefix, epochs=3)
