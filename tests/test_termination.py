"""The termination message (termination.py) and cli.main writing it on every exit path.

The file is a real file under tmp_path, named by TRAINJOB_TERMINATION_LOG as a container's
would be; the exit paths run the real CLI (in process, or in a subprocess for the
``os._exit`` path), with only the training replaced where a job error is the subject.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types

import pytest

from trainjob import termination
from trainjob.cli import main

RUN = "s3://bucket/runs/r1"


@pytest.fixture
def log_file(tmp_path, monkeypatch):
    """TRAINJOB_TERMINATION_LOG set to a file in tmp_path; no run remembered."""
    path = tmp_path / "termination-log"
    monkeypatch.setenv(termination.ENV, str(path))
    termination.record_run(None)
    yield path
    termination.record_run(None)


# --- the text -------------------------------------------------------------------------------

def test_message_names_the_code_the_reason_and_the_run():
    assert termination.message(143, "stopped by signal in epoch 2 after batch 4", RUN) == \
        f"preempted (exit 143): stopped by signal in epoch 2 after batch 4; run {RUN}"
    assert termination.message(0, "", RUN) == f"succeeded (exit 0): run {RUN} published"
    assert termination.message(2, "--data is required", None) == \
        "usage error (exit 2): --data is required"
    assert termination.message(0, "") == "succeeded (exit 0)"
    assert termination.message(99, "odd").startswith("failed (exit 99): odd")


def test_message_is_one_line_and_redacts_urls():
    text = termination.message(
        4, "endpoint http://admin:s3cr3t@minio:9000/bucket\nrefused", "s3://key:hunter2@b/r")
    assert "\n" not in text
    assert "s3cr3t" not in text and "hunter2" not in text
    assert "http://minio:9000/bucket refused" in text and "run s3://b/r" in text


def test_message_fits_kubernetes_limit_and_keeps_the_run():
    reason = "é" * 5000 + " tail"  # 2 bytes each in UTF-8: the cut must not split one
    text = termination.message(5, reason, RUN)
    data = text.encode()
    assert len(data) <= termination.LIMIT_BYTES == 4096
    assert text.endswith(f"...; run {RUN}") and text.startswith("training error (exit 5): éé")
    assert len(data) > 4000  # shortened, not dropped


# --- where it goes --------------------------------------------------------------------------

def test_write_replaces_the_whole_file_last_call_wins(log_file):
    termination.record_run(RUN)
    termination.write(5, "x" * 500)
    termination.write(143, "stopped by signal in epoch 0 after batch 1")
    assert log_file.read_text() == \
        f"preempted (exit 143): stopped by signal in epoch 0 after batch 1; run {RUN}"


def test_default_path_only_when_it_exists_and_is_writable(tmp_path, monkeypatch):
    monkeypatch.delenv(termination.ENV, raising=False)
    default = tmp_path / "dev" / "termination-log"
    monkeypatch.setattr(termination, "DEFAULT_PATH", str(default))
    default.parent.mkdir()  # as /dev is on a workstation: there, but no termination-log
    termination.write(0, "")
    assert not default.exists()  # never created
    default.write_text("")
    termination.write(3, "no images")
    assert default.read_text() == "data error (exit 3): no images"


def test_an_empty_variable_turns_it_off(tmp_path, monkeypatch):
    default = tmp_path / "termination-log"
    default.write_text("before")
    monkeypatch.setattr(termination, "DEFAULT_PATH", str(default))
    monkeypatch.setenv(termination.ENV, "")
    termination.write(2, "bad")
    assert default.read_text() == "before"


def test_write_never_raises(tmp_path, monkeypatch):
    for target in (tmp_path, tmp_path / "missing" / "log"):  # a folder; no parent
        monkeypatch.setenv(termination.ENV, str(target))
        termination.write(1, "unexpected")
    assert not (tmp_path / "missing").exists()


def test_a_stuck_writer_never_blocks_another_thread(log_file, monkeypatch):
    """A watchdog thread writes and exits even while another write holds the lock."""
    monkeypatch.setattr(termination, "LOCK_WAIT_SECONDS", 0.3)  # 2 s in the job
    done = threading.Event()
    with termination._lock:  # as a writer stuck mid-write in the main thread would
        started = time.monotonic()
        thread = threading.Thread(target=lambda: (termination.write(143, "by watchdog"),
                                                  done.set()))
        thread.start()
        finished = done.wait(timeout=termination.LOCK_WAIT_SECONDS + 5)
        waited = time.monotonic() - started
    thread.join(timeout=5)
    assert finished, "write() blocked on a lock another thread held"
    assert waited >= termination.LOCK_WAIT_SECONDS * 0.9
    assert log_file.read_text() == "preempted (exit 143): by watchdog"


# --- every exit of cli.main -----------------------------------------------------------------

def test_main_writes_usage_errors_and_successes(log_file, monkeypatch, capsys):
    for name in [k for k in os.environ if k.startswith("TRAINJOB_") and k != termination.ENV]:
        monkeypatch.delenv(name)
    assert main(["train", "--data", "ftp://nowhere/x.zip", "--output", RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert log_file.read_text() == \
        "usage error (exit 2): " + err.removeprefix("trainjob: error: ")
    assert "unsupported URI scheme" in log_file.read_text()

    assert main(["train", "--no-such-option"]) == 2  # click's own usage error
    assert log_file.read_text() == ("usage error (exit 2): No such option '--no-such-option'. "
                                    "(see 'trainjob train --help')")

    assert main(["--version"]) == 0
    assert log_file.read_text() == "succeeded (exit 0)"


def fake_job(monkeypatch, run) -> None:
    """The training module replaced by one whose run() is ``run`` (no TensorFlow import)."""
    import trainjob

    module = types.ModuleType("trainjob.job")
    module.run = run
    monkeypatch.setitem(sys.modules, "trainjob.job", module)
    monkeypatch.setattr(trainjob, "job", module, raising=False)


def test_main_writes_job_errors_with_the_run(log_file, monkeypatch):
    from trainjob.errors import DataError

    for name in [k for k in os.environ if k.startswith("TRAINJOB_") and k != termination.ENV]:
        monkeypatch.delenv(name)

    def fail(cfg):
        raise DataError("only 1 usable class in s3://d/x.zip: need at least 2")

    fake_job(monkeypatch, fail)
    assert main(["train", "--data", "s3://d/x.zip", "--output", RUN]) == 3
    assert log_file.read_text() == ("data error (exit 3): only 1 usable class in "
                                    f"s3://d/x.zip: need at least 2; run {RUN}")

    fake_job(monkeypatch, lambda cfg: None)
    assert main(["train", "--data", "s3://d/x.zip", "--output", RUN]) == 0
    assert log_file.read_text() == f"succeeded (exit 0): run {RUN} published"

    fake_job(monkeypatch, lambda cfg: {}["boom"])
    assert main(["train", "--data", "s3://d/x.zip", "--output", RUN]) == 1
    assert log_file.read_text().startswith("failed (exit 1): unexpected KeyError: 'boom'")


# A stand-in for the training module: the job raises Preempted as a SIGTERM makes it.
PREEMPTED = """
import sys, types
from trainjob.errors import Preempted
fake = types.ModuleType("trainjob.job")
def run(cfg):
    raise Preempted("stopped by signal in epoch 2 after batch 4")
fake.run = run
sys.modules["trainjob.job"] = fake
from trainjob.cli import main
sys.exit(main(["train", "--data", "s3://d/x.zip", "--output", "s3://bucket/runs/r1"]))
"""


def test_the_os_exit_path_writes_preempted(tmp_path):
    log = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINJOB_")}
    proc = subprocess.run([sys.executable, "-c", PREEMPTED], capture_output=True, text=True,
                          timeout=120, env={**env, termination.ENV: str(log)})
    assert proc.returncode == 143, proc.stderr
    assert log.read_text() == ("preempted (exit 143): stopped by signal in epoch 2 after "
                               f"batch 4; run {RUN}")
