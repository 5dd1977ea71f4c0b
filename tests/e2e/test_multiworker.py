"""Several workers: real `trainjob train` processes on 127.0.0.1 forming a
MultiWorkerMirroredStrategy cluster, against a real S3 server over HTTP.

One run is shared, over six launches (the suite's time budget):

1. the Indexed-Job launch gets SIGTERM on worker 1 while the chief's last save point is held
   in a proxy on its way to the bucket;
2. worker 1's replacement starts meanwhile, the chief's once that save point has landed
   (TF_CONFIG): both start from the chief's save point; worker 1 then runs out of memory in
   the validation collective (a test hook), and the chief loses its peer there;
3. the next restart hangs in a collective (worker 1 wedged), and a SIGTERM to the chief
   still ends it inside the grace period (the signal watchdog);
4. the next restart trains to the end, and its chief is SIGKILLed after training;
5. both are relaunched: worker 1 exits at once, and the chief evaluates and publishes alone,
   without the cluster;
6. one worker trains the same run with Keras' fit, and the run folders are compared.

The cluster is the subject, so the workers train the small stand-in backbone (ResNet50's
kinds of layer, few weights): two processes tracing ResNet50 at once cost about a minute
of both cores per launch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    SMALL,
    SMALL_STAND_IN,
    consecutive_free_ports,
    free_ports,
    run_trainjob,
    start_trainjob,
)
from helpers.checks import assert_complete_run
from helpers.faultproxy import FaultProxy
from helpers.jobs import csv_epochs, hooks_file, stored_json, wait_for

pytestmark = pytest.mark.e2e

EPOCHS = 4
STEPS = 4  # global batches of 8 per epoch
BARRIER = "waiting up to"  # collective.make_strategy's line, as a worker enters the barrier


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _args(dataset: str, out: str, *extra: str) -> list[str]:
    return ["train", "--data", dataset, "--output", out, "--epochs", str(EPOCHS),
            "--steps-per-epoch", str(STEPS), "--no-restore-best", "--collective-timeout", "90",
            *SMALL, *extra]


@pytest.fixture
def started():
    """Every worker process a test starts; those still running at its end are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(args: list[str], env: dict, tmp_path: Path, tag: str, index: int,
           started: list) -> tuple[subprocess.Popen, Path]:
    """Worker ``index``, with its own TRAINJOB_HOME (no shared filesystem), kept across
    launches like a node's cache."""
    log = tmp_path / f"{tag}-worker{index}.log"
    proc = start_trainjob(args, env, tmp_path / f"home{index}", log)
    started.append(proc)
    return proc, log


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


def _error_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("trainjob: error:")]


def _weights(tmp_path: Path, index: int) -> dict:
    return json.loads((tmp_path / f"home{index}" / "work" / "worker-weights.json").read_text())


def _published_trainable_digest(s3, bucket: str, prefix: str, tmp_path: Path) -> str:
    import keras

    import trainjob.train.model  # noqa: F401 - registers the preprocessing layer
    from trainjob.train.trainer import weights_digest

    path = tmp_path / "model.keras"
    s3.client().download_file(bucket, f"{prefix}/model/model.keras", str(path))
    return weights_digest(keras.saving.load_model(path).trainable_weights)


@pytest.mark.timeout(1800)
def test_sigterm_then_peer_killed_then_group_restart_completes(s3, bucket, dataset, tmp_path,
                                                                started):
    """The six launches of the module's docstring, on one run folder."""
    prefix = "runs/multi"
    out = f"s3://{bucket}/{prefix}"
    stand_in = hooks_file(tmp_path, "stand_in.json", **SMALL_STAND_IN)

    # 1. Configured as in an Indexed Job: JOB_COMPLETION_INDEX, --workers and a host
    #    pattern (here one host, a port per worker). Worker 1 waits after the first batch of
    #    epoch 1 until its SIGTERM, so the group stops at a known step (epoch 1, batch 2: a
    #    save point). The chief talks to the store through a proxy, which holds its writes
    #    under backup/ from the signal on: its last save point is on its way, not stored.
    first_port = consecutive_free_ports(2)
    held = hooks_file(tmp_path, "held.json", **SMALL_STAND_IN,
                  hold={"batch:1:1": {"seconds": 300, "until_signal": True}})
    args = _args(dataset, out, "--workers", "2", "--worker-hosts", "127.0.0.1:{port}",
                 "--worker-port", str(first_port), "--backup-every-steps", "2")
    with FaultProxy(s3.endpoint) as link:
        # The chief's grace period outlasts the start of worker 1's replacement, whatever
        # the machine's speed; the test ends the hold well before it runs out.
        chief, chief_log = _start(args, s3.env(
            JOB_COMPLETION_INDEX="0", TRAINJOB_TEST_HOOKS=stand_in,
            AWS_ENDPOINT_URL=link.endpoint, TRAINJOB_GRACE_SECONDS="240"),
            tmp_path, "first", 0, started)
        other, other_log = _start(args, s3.env(JOB_COMPLETION_INDEX="1",
                                               TRAINJOB_TEST_HOOKS=held),
                                  tmp_path, "first", 1, started)
        wait_for(lambda: "holding at batch:1:1" in other_log.read_text(), other, other_log)
        link.hold(rf"^PUT /{bucket}/{prefix}/backup/")
        signalled = time.monotonic()
        other.send_signal(signal.SIGTERM)
        # The signalled worker is the one on a grace clock (its pod is being deleted).
        assert other.wait(timeout=60) == 143, other_log.read_text()[-3000:]
        assert time.monotonic() - signalled < 25, "the signalled worker overran --grace-seconds"
        # Only the chief writes to --output: the other worker's files stay in its own folder.
        assert (tmp_path / "home1" / "work" / "worker-1" / "status.json").exists()
        wait_for(link.holding.is_set, chief, chief_log)  # the last save point is on its way
        stale = stored_json(s3, bucket, prefix, "backup/state.json")

        # 2. Worker 1's replacement starts while the bucket still holds the older save
        #    point; once it waits at the start-up barrier, the old chief's upload lands
        #    (inside its grace period), then the chief's replacement starts.
        ports = free_ports(2)
        oom = hooks_file(tmp_path, "oom.json", **SMALL_STAND_IN,
                     collective_error={"validation": "ResourceExhaustedError"})
        other, other_log = _start(_args(dataset, out), s3.env(
            TF_CONFIG=_tf_config(ports, 1), TRAINJOB_TEST_HOOKS=oom), tmp_path, "second", 1,
            started)
        wait_for(lambda: BARRIER in other_log.read_text(), other, other_log)
        assert chief.poll() is None, "the old chief gave up its last save point"
        link.release()
        assert chief.wait(timeout=120) == 143, chief_log.read_text()[-3000:]
    assert "a peer worker was signalled" in chief_log.read_text()
    assert stored_json(s3, bucket, prefix)["state"] == "preempted"
    state = s3.read_json(bucket, f"{prefix}/backup/state.json")
    assert (state["epoch"], state["step"]) == (1, 2), state
    assert (stale.get("epoch"), stale.get("step")) != (1, 2), "the hold came too late"
    config = s3.read_json(bucket, f"{prefix}/config.json")
    assert config["distribution"]["workers"] == 2 and config["distribution"]["replicas"] == 2
    assert config["distribution"]["cluster"]["source"].startswith("JOB_COMPLETION_INDEX")

    chief, chief_log = _start(_args(dataset, out), s3.env(
        TF_CONFIG=_tf_config(ports, 0), TRAINJOB_TEST_HOOKS=stand_in), tmp_path, "second", 0,
        started)
    pair = [(chief, chief_log), (other, other_log)]
    codes = _wait_all(pair, timeout=300)
    # Both start from the save point the chief chose, not from what worker 1 found.
    resumed = f"resuming at epoch {state['epoch']}, batch {state['step']}"
    for _, log in pair:
        assert resumed in log.read_text(), log.read_text()[-3000:]
    # Worker 1 runs out of memory in the validation collective: exit 5, one line. The
    # chief, whose peer is gone in the middle of that collective, exits 4 and says so.
    assert codes[1] == 5, other_log.read_text()[-3000:]
    assert _error_lines(other_log) == ["trainjob: error: worker 1: out of memory while training: "
                                       "lower --batch-size or --image-size"]
    assert "Traceback" not in other_log.read_text()
    assert codes[0] == 4, chief_log.read_text()[-3000:]
    assert len(_error_lines(chief_log)) == 1
    assert "a peer worker died or stopped responding" in _error_lines(chief_log)[0]
    assert stored_json(s3, bucket, prefix)["state"] == "failed"

    # 3. The group restarts, and worker 1 hangs after a batch (a hold that never returns,
    #    as a wedged peer), so the chief waits in the next step's collective. A SIGTERM to
    #    the chief then: the main thread cannot stop there before the collective time-out
    #    (90 s), so the signal watchdog stops the run inside --grace-seconds: exit 143,
    #    status preempted, the bucket's save point kept.
    ports = free_ports(2)
    wedged = hooks_file(tmp_path, "wedged.json", **SMALL_STAND_IN,
                    hold={f"batch:{state['epoch']}:{state['step'] + 1}": 600})
    chief, chief_log = _start([*_args(dataset, out), "--grace-seconds", "10"], s3.env(
        TF_CONFIG=_tf_config(ports, 0), TRAINJOB_TEST_HOOKS=stand_in), tmp_path, "hung", 0,
        started)
    other, other_log = _start(_args(dataset, out), s3.env(
        TF_CONFIG=_tf_config(ports, 1), TRAINJOB_TEST_HOOKS=wedged), tmp_path, "hung", 1,
        started)
    wait_for(lambda: "test hook: holding at batch" in other_log.read_text(), other, other_log)
    signalled = time.monotonic()
    chief.send_signal(signal.SIGTERM)
    code = _wait_all([(chief, chief_log)], timeout=60)[0]
    elapsed = time.monotonic() - signalled
    other.kill()
    other.wait(timeout=30)
    assert code == 143, chief_log.read_text()[-3000:]
    assert elapsed < 10, f"the chief took {elapsed:.1f}s with --grace-seconds 10"
    assert "grace period ran out" in _error_lines(chief_log)[0]
    assert stored_json(s3, bucket, prefix)["state"] == "preempted"
    assert s3.read_json(bucket, f"{prefix}/backup/state.json")["seq"] == state["seq"]

    # 4. The next restart resumes at the same save point and trains to the end; the chief
    #    is SIGKILLed after training, once worker 1 has left (training is over).
    ports = free_ports(2)
    after = hooks_file(tmp_path, "after.json", **SMALL_STAND_IN, hold={"after_training": 300})
    chief, chief_log = _start(_args(dataset, out), s3.env(
        TF_CONFIG=_tf_config(ports, 0), TRAINJOB_TEST_HOOKS=after), tmp_path, "third", 0,
        started)
    other, other_log = _start(_args(dataset, out), s3.env(
        TF_CONFIG=_tf_config(ports, 1), TRAINJOB_TEST_HOOKS=stand_in), tmp_path, "third", 1,
        started)
    assert _wait_all([(other, other_log)]) == [0], other_log.read_text()[-3000:]
    wait_for(lambda: "holding at after_training" in chief_log.read_text(), chief, chief_log)
    chief.send_signal(signal.SIGKILL)
    chief.wait(timeout=30)
    for log in (chief_log, other_log):
        assert resumed in log.read_text(), log.read_text()[-3000:]

    # 5. Both are relaunched (a JobSet restarts the whole group). Worker 1 finds training
    #    finished and exits 0 at once; the chief, with a long --cluster-timeout, evaluates
    #    and publishes alone: no start-up barrier, no cluster.
    again = run_trainjob([*_args(dataset, out), "--cluster-timeout", "30"], s3.env(
        TF_CONFIG=_tf_config(ports, 1), TRAINJOB_TEST_HOOKS=stand_in), tmp_path / "home1",
        timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert BARRIER not in again.stdout and "training is finished" in again.stdout
    relaunched = time.monotonic()
    lone = run_trainjob([*_args(dataset, out), "--cluster-timeout", "600"], s3.env(
        TF_CONFIG=_tf_config(ports, 0), TRAINJOB_TEST_HOOKS=stand_in), tmp_path / "home0",
        timeout=300)
    assert lone.returncode == 0, lone.stdout[-3000:] + lone.stderr[-2000:]
    assert time.monotonic() - relaunched < 60, "the lone chief took a minute to publish"
    assert BARRIER not in lone.stdout and "cluster formed" not in lone.stdout
    assert csv_epochs(s3, bucket, prefix) == list(range(EPOCHS))
    assert_complete_run(s3, bucket, prefix, epochs=EPOCHS)  # each epoch once, one manifest
    assert sum(k.endswith("manifest.json") for k in s3.keys(bucket, prefix + "/")) == 1
    # The step count of a run that was never stopped: no step twice, none lost.
    history = s3.read_json(bucket, f"{prefix}/history.json")
    assert [row["iterations"] for row in history] == [STEPS * (e + 1) for e in range(EPOCHS)]
    config = s3.read_json(bucket, f"{prefix}/config.json")
    assert config["distribution"]["workers"] == 2 and config["distribution"]["replicas"] == 2
    first, second = _weights(tmp_path, 0), _weights(tmp_path, 1)
    assert first["epochs"] == second["epochs"] == EPOCHS
    assert first["trainable_sha256"] == second["trainable_sha256"]
    assert _published_trainable_digest(s3, bucket, prefix, tmp_path) == \
        first["trainable_sha256"]

    # 6. One worker trains with Keras' fit, several with the custom step: the run folders
    #    must be alike, file for file and field for field (docs/distributed.md says why both).
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
    assert [row["iterations"] for row in s3.read_json(bucket, "runs/single/history.json")] == \
        [row["iterations"] for row in history]
    distribution = s3.read_json(bucket, "runs/single/config.json")["distribution"]
    assert distribution["workers"] == 1 and distribution["cluster"] is None

    # `runs compare` on the run folders these real runs wrote: one row each, its figures
    # those of the run's own files, and the validation curves' picture.
    picture = tmp_path / "curves.png"
    compared = run_trainjob(["runs", "compare", f"s3://{bucket}/runs/", "--json",
                             "--plot", str(picture)], s3.env(), tmp_path / "compare",
                            timeout=120)
    assert compared.returncode == 0, compared.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(compared.stdout)}
    assert set(rows) == {"multi", "single"}
    for name, row in rows.items():
        runs_history = s3.read_json(bucket, f"runs/{name}/history.json")
        metrics = s3.read_json(bucket, f"runs/{name}/metrics.json")
        assert (row["status"], row["finished"], row["epochs_done"]) == ("succeeded", True,
                                                                        EPOCHS)
        assert row["best_val_accuracy"] == max(h["val_accuracy"] for h in runs_history)
        assert row["final_val_loss"] == pytest.approx(runs_history[-1]["val_loss"])
        assert row["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
