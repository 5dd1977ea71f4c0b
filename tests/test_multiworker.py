"""Several workers: real `trainjob train` processes on 127.0.0.1 forming a
MultiWorkerMirroredStrategy cluster, against a real S3 server over HTTP.

One run is shared: the Indexed-Job launch gets SIGTERM, its restart (configured by
TF_CONFIG) loses a peer to SIGKILL, and the next restart is the complete two-worker run
checked file by file. The cluster is the subject, so the workers train the stand-in
backbone (ResNet50's weight count, a sliver of its compute): two processes tracing ResNet50
at once cost about a minute of both cores per launch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (consecutive_free_ports, free_ports, SMALL, SMALL_STAND_IN, run_trainjob,
                      start_trainjob)
from test_e2e import assert_complete_run
from test_resume import _csv_epochs, _hooks, _status, _wait_for

pytestmark = pytest.mark.e2e

EPOCHS = 4  # the signal may land in epoch 1 or 2; the kill needs an epoch after that
STEPS = 4  # global batches of 8 per epoch


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _tf_config_envs(s3, hooks: str) -> list[dict[str, str]]:
    """Each worker's environment for a group configured by TF_CONFIG, on fresh ports."""
    ports = free_ports(2)
    return [s3.env(TF_CONFIG=_tf_config(ports, i), TRAINJOB_TEST_HOOKS=hooks) for i in range(2)]


def _args(dataset: str, out: str, *extra: str) -> list[str]:
    return ["train", "--data", dataset, "--output", out, "--epochs", str(EPOCHS),
            "--steps-per-epoch", str(STEPS), "--no-restore-best", "--collective-timeout", "90",
            *SMALL, *extra]


def _start_pair(args: list[str], envs: list[dict], tmp_path: Path, tag: str
                ) -> list[tuple[subprocess.Popen, Path]]:
    """Two workers, each with its own TRAINJOB_HOME (no shared filesystem)."""
    out = []
    for i, env in enumerate(envs):
        log = tmp_path / f"{tag}-worker{i}.log"
        out.append((start_trainjob(args, env, tmp_path / f"home{i}", log), log))
    return out


def _wait_all(pair, timeout: float = 600) -> list[int]:
    codes = []
    for proc, log in pair:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p, _ in pair:
                p.kill()
            pytest.fail(f"a worker hung; its log:\n{log.read_text()[-3000:]}")
    return codes


def _weights(tmp_path: Path, index: int) -> dict:
    return json.loads((tmp_path / f"home{index}" / "work" / "worker-weights.json").read_text())


def _published_trainable_digest(s3, bucket: str, prefix: str, tmp_path: Path) -> str:
    import keras

    import trainjob.model  # noqa: F401 - registers the preprocessing layer
    from trainjob.training import weights_digest

    path = tmp_path / "model.keras"
    s3.client().download_file(bucket, f"{prefix}/model/model.keras", str(path))
    return weights_digest(keras.saving.load_model(path).trainable_weights)


@pytest.mark.timeout(1800)
def test_sigterm_then_peer_killed_then_group_restart_completes(s3, bucket, dataset, tmp_path):
    """One run, three launches of the group (the suite's time budget): SIGTERM to the
    worker that is not the chief (an Indexed Job's pods); the restart (TF_CONFIG) loses a
    peer to SIGKILL; the next restart completes. Then one worker with Keras' fit makes the
    same run folder."""
    prefix = "runs/multi"
    out = f"s3://{bucket}/{prefix}"
    first_port = consecutive_free_ports(2)
    # 1. Configured as in an Indexed Job: JOB_COMPLETION_INDEX, --workers and a host
    #    pattern (here one host, a port per worker). SIGTERM to the worker that is not the
    #    chief, inside epoch 1: the whole group stops at one agreed step.
    # Steps paced to last about as long as ResNet50's would (two workers, 32 px: ~4 s), so
    # the signal lands inside training; the small stand-in spares the CPU of all-reducing
    # and saving 94 MB at every step and epoch end.
    paced = _hooks(tmp_path, "paced.json", **SMALL_STAND_IN, sleep_after_batch=2.0)
    indexed = [s3.env(JOB_COMPLETION_INDEX=str(i), TRAINJOB_TEST_HOOKS=paced) for i in range(2)]
    args = _args(dataset, out, "--workers", "2", "--worker-hosts", "127.0.0.1:{port}",
                 "--worker-port", str(first_port), "--backup-every-steps", "2")
    pair = _start_pair(args, indexed, tmp_path, "first")
    (chief, chief_log), (other, other_log) = pair
    _wait_for(lambda: _status(s3, bucket, prefix).get("epochs_done", 0) >= 1, chief, chief_log)
    started = time.monotonic()
    other.send_signal(signal.SIGTERM)
    # The signalled worker is the one on a grace clock (its pod is being deleted); the chief
    # was not signalled, and stops once it has flushed the agreed save point.
    assert other.wait(timeout=60) == 143, other_log.read_text()[-3000:]
    assert time.monotonic() - started < 25, "the signalled worker overran --grace-seconds"
    assert _wait_all(pair, timeout=120) == [143, 143], chief_log.read_text()[-3000:]
    assert _status(s3, bucket, prefix)["state"] == "preempted"
    state = s3.read_json(bucket, f"{prefix}/backup/state.json")
    assert state["epoch"] >= 1
    assert "a peer worker was signalled" in chief_log.read_text()
    # Only the chief writes to --output: the other worker's files stay in its own folder.
    assert (tmp_path / "home1" / "work" / "worker-1" / "status.json").exists()
    config = s3.read_json(bucket, f"{prefix}/config.json")
    assert config["distribution"]["workers"] == 2 and config["distribution"]["replicas"] == 2
    assert config["distribution"]["cluster"]["source"].startswith("JOB_COMPLETION_INDEX")

    # 2. The group restarts, configured by TF_CONFIG this time, and resumes where the
    #    signal stopped it. The other worker pauses after that epoch, so the chief is inside
    #    the next one, waiting on it, when it is SIGKILLed: the chief fails that step and
    #    exits 4 within the collective time-out, naming the cause.
    envs = _tf_config_envs(s3, paced)
    envs[1]["TRAINJOB_TEST_HOOKS"] = _hooks(tmp_path, "pause.json", **SMALL_STAND_IN,
                                            hold={f"epoch:{state['epoch']}": 120})
    pair = _start_pair(_args(dataset, out), envs, tmp_path, "second")
    (chief, chief_log), (other, other_log) = pair
    _wait_for(lambda: _status(s3, bucket, prefix).get("epochs_done", 0) > state["epoch"],
              chief, chief_log)
    other.send_signal(signal.SIGKILL)
    started = time.monotonic()
    rc = chief.wait(timeout=150)
    assert rc == 4, chief_log.read_text()[-3000:]
    assert time.monotonic() - started < 90 + 15, "the survivor outlived --collective-timeout"
    assert "a peer worker died or stopped responding" in chief_log.read_text()
    assert _status(s3, bucket, prefix)["state"] == "failed"
    for log in (chief_log, other_log):
        assert f"resuming at epoch {state['epoch']}, batch {state['step']}" in log.read_text()

    # 3. The next restart resumes at the epoch the chief died in and publishes once.
    stand_in = _hooks(tmp_path, "stand_in.json", **SMALL_STAND_IN)
    envs = _tf_config_envs(s3, stand_in)
    pair = _start_pair(_args(dataset, out), envs, tmp_path, "third")
    assert _wait_all(pair) == [0, 0], pair[0][1].read_text()[-4000:]
    for _, log in pair:
        assert f"resuming at epoch {state['epoch'] + 1}, batch 0" in log.read_text()
    assert _csv_epochs(s3, bucket, prefix) == list(range(EPOCHS))
    assert_complete_run(s3, bucket, prefix, epochs=EPOCHS)  # each epoch once, one manifest
    assert sum(k.endswith("manifest.json") for k in s3.keys(bucket, prefix + "/")) == 1
    first, second = _weights(tmp_path, 0), _weights(tmp_path, 1)
    assert first["epochs"] == second["epochs"] == EPOCHS
    assert first["trainable_sha256"] == second["trainable_sha256"]
    assert _published_trainable_digest(s3, bucket, prefix, tmp_path) == \
        first["trainable_sha256"]

    # One worker trains with Keras' fit, several with the custom step: the run folders must
    # be alike, file for file and field for field (docs/distributed.md says why both).
    single = run_trainjob(_args(dataset, f"s3://{bucket}/runs/single"),
                          s3.env(TRAINJOB_TEST_HOOKS=stand_in), tmp_path / "single")
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-2000:]
    assert_complete_run(s3, bucket, "runs/single", epochs=EPOCHS)
    multi_files = set(s3.read_json(bucket, f"{prefix}/manifest.json")["files"])
    assert set(s3.read_json(bucket, "runs/single/manifest.json")["files"]) == multi_files
    header = [s3.read(bucket, f"{p}/training_log.csv").decode().splitlines()[0]
              for p in (prefix, "runs/single")]
    assert header[0] == header[1]
    for name in ("history.json", "metrics.json", "config.json", "status.json"):
        multi, one = (s3.read_json(bucket, f"{p}/{name}") for p in (prefix, "runs/single"))
        keys = (lambda d: set(d[0]) if isinstance(d, list) else set(d))
        assert keys(multi) == keys(one), name
    distribution = s3.read_json(bucket, "runs/single/config.json")["distribution"]
    assert distribution["workers"] == 1 and distribution["cluster"] is None


def test_lone_worker_times_out_naming_its_peer(s3, bucket, dataset, tmp_path):
    ports = free_ports(2)
    started = time.monotonic()
    result = run_trainjob(
        [*_args(dataset, f"s3://{bucket}/runs/alone"), "--cluster-timeout", "5"],
        s3.env(TF_CONFIG=_tf_config(ports, 1)), tmp_path / "home", timeout=120)
    assert result.returncode == 4, result.stdout[-3000:] + result.stderr[-2000:]
    lines = result.error_lines()
    assert len(lines) == 1, lines
    assert f"worker 0 (127.0.0.1:{ports[0]}) did not join within --cluster-timeout 5s" \
        in lines[0]
    assert time.monotonic() - started < 60
