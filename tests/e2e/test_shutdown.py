"""A SIGTERM at any moment ends the job within --grace-seconds: exit 143, the bucket's status
"preempted", the run lock released, the newest save point wholly stored kept.

Real `trainjob train` processes against a real S3 server over HTTP. A test hook holds the
job at a named point (it logs "test hook: holding at <point>"), so the signal lands there
whatever the machine's speed."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SMALL, STAND_IN, start_trainjob
from helpers.jobs import hooks_file, stored_json, wait_for

pytestmark = pytest.mark.e2e


def _exit_code(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    """The process's exit code; a failure (and the process killed) if it outlives ``timeout``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {timeout:g}s after the signal:\n{log.read_text()[-3000:]}")


def test_a_first_step_longer_than_the_grace_period_still_stops_in_time(s3, bucket, dataset,
                                                                       tmp_path):
    """The first step holds for two minutes, as a first trace under XLA can on a GPU: the
    signal handler cannot stop it (Python runs handlers between bytecodes, and training
    stops at a batch end), so the watchdog stops the run from its own thread."""
    prefix = "runs/first-step"
    args = ["train", "--data", dataset, "--output", f"s3://{bucket}/{prefix}", "--epochs", "2",
            "--steps-per-epoch", "2", "--grace-seconds", "10", *SMALL]
    log = tmp_path / "job.log"
    hooks = hooks_file(tmp_path, **STAND_IN, hold={"first_step": 120})
    message = tmp_path / "termination-log"
    proc = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks,
                                       TRAINJOB_TERMINATION_LOG=str(message)),
                          tmp_path / "home", log)
    wait_for(lambda: "test hook: holding at first_step" in log.read_text(), proc, log)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = _exit_code(proc, 30, log)
    elapsed = time.monotonic() - started
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert elapsed < 10, f"took {elapsed:.1f}s with --grace-seconds 10"
    status = stored_json(s3, bucket, prefix)
    assert status["state"] == "preempted", status
    assert "grace period ran out" in status["error"]
    assert not any(k.endswith("run.lock.json") for k in s3.keys(bucket, prefix + "/"))
    errors = [line for line in text.splitlines() if line.startswith("trainjob: error")]
    assert len(errors) == 1 and "grace period ran out" in errors[0], errors
    assert message.read_text().startswith("preempted (exit 143): stopped by SIGTERM: the "
                                          "grace period ran out"), message.read_text()


def test_a_signal_during_the_last_epochs_save_stops_before_publishing(s3, bucket, dataset,
                                                                       tmp_path):
    """A SIGTERM that arrives while the final epoch is saved (nothing left to train, so no
    batch end will come) stops the job there: exit 143, status preempted, no manifest. It
    used to be ignored, and the job went on to evaluate and publish."""
    prefix = "runs/last-epoch"
    args = ["train", "--data", dataset, "--output", f"s3://{bucket}/{prefix}", "--epochs", "1",
            "--steps-per-epoch", "2", *SMALL]
    log = tmp_path / "job.log"
    hooks = hooks_file(tmp_path, **STAND_IN, hold={"epoch:0": {"seconds": 600,
                                                           "until_signal": True}})
    proc = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks), tmp_path / "home", log)
    wait_for(lambda: "test hook: holding at epoch:0" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert _exit_code(proc, 60, log) == 143, log.read_text()[-3000:]
    status = stored_json(s3, bucket, prefix)
    assert (status["state"], status["error"]) == ("preempted", "stopped by signal after epoch 0")
    assert status["epochs_done"] == 1
    assert not any(k.endswith("manifest.json") for k in s3.keys(bucket, prefix + "/"))
