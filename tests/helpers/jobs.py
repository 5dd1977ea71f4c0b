"""Jobs started as real processes, and waiting for a state of theirs: a log line, a
stored status, never a count of events or an assumed speed."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Seconds added to every training step of the jobs these tests start, when set: the suite
# run as on a machine much slower than this one (docs/testing.md, "Speed"). Unset, steps
# run as fast as the machine goes (the stand-in backbone's take milliseconds).
PACE = os.environ.get("TRAINJOB_TEST_PACE")


def hooks_file(tmp_path: Path, file: str = "hooks.json", **hooks) -> str:
    """A test hooks file for a job (trainjob.hooks): holds, stand-in backbone, timings."""
    if PACE is not None:
        hooks["sleep_after_batch"] = float(PACE)
    path = tmp_path / file
    path.write_text(json.dumps(hooks))
    return str(path)


def stored_json(s3, bucket: str, prefix: str, name: str = "status.json") -> dict:
    """A JSON file of a run folder as the bucket holds it; {} while it is not there."""
    try:
        return s3.read_json(bucket, f"{prefix}/{name}")
    except Exception:  # noqa: BLE001 - not there yet
        return {}


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    """Wait until ``predicate()`` holds; fail at once if the job exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"job exited {proc.returncode} early:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"timed out waiting; log:\n{log.read_text()[-4000:]}")


def csv_epochs(s3, bucket: str, prefix: str) -> list[int]:
    """The epochs of the stored training_log.csv, in order."""
    rows = csv.DictReader(io.StringIO(s3.read(bucket, f"{prefix}/training_log.csv").decode()))
    return [int(r["epoch"]) for r in rows]


def cli_in_subprocess(s3, home, *args: str) -> tuple[int, str, str, list[str]]:
    """Run trainjob's main() in a fresh interpreter; report which heavy modules it loaded."""
    code = ("import sys, json\n"
            "from trainjob.cli import main\n"
            f"rc = main({list(args)!r})\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY=' + json.dumps(heavy))\n"
            "sys.exit(rc)\n")
    env = {**s3.env(), "TRAINJOB_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    heavy = json.loads(proc.stdout.rsplit("HEAVY=", 1)[1])
    return proc.returncode, proc.stdout, proc.stderr, heavy
