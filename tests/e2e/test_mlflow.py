"""MLflow, end to end: a real `trainjob train` killed with SIGKILL mid-run and resumed by a
new pod leaves exactly one MLflow run on a real tracking server (`mlflow server`, SQLite),
its metric history each epoch once, with the run folder's values, and status FINISHED.
A SIGTERM marks the MLflow run KILLED, and the resumed job continues it; a tracking server
stopped while the job runs changes nothing of the job's outcome. (A tracking server that
is not there at all is the short outage test's: test_sync.py.)"""

from __future__ import annotations

import signal
import time

import mlflow
import pytest
from conftest import SMALL, STAND_IN, run_trainjob, start_trainjob
from helpers.jobs import hooks_file, stored_json, wait_for
from helpers.mlflowserver import start_mlflow, stop_mlflow

pytestmark = pytest.mark.e2e


def test_a_run_killed_and_resumed_is_one_mlflow_run_with_each_epoch_once(
        s3, bucket, dataset, mlflow_server, tmp_path):
    prefix = "runs/tracked"
    experiment = f"e2e-{bucket}"
    args = ["train", "--data", dataset, "--output", f"s3://{bucket}/{prefix}", "--epochs", "4",
            "--steps-per-epoch", "2", "--mlflow-tracking-uri", mlflow_server.url,
            "--mlflow-experiment", experiment, *SMALL]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)

    def logged_epochs() -> list[int]:
        record = stored_json(s3, bucket, prefix, "tracking.json")
        if not record.get("run_id"):
            return []
        return sorted(m.step for m in client.get_metric_history(record["run_id"], "loss"))

    log = tmp_path / "first.log"
    hooks = hooks_file(tmp_path, **STAND_IN, hold={"epoch:1": 600})
    image = "registry.example/trainjob:9.9.9"  # as the image or k8s/ sets it
    proc = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks, TRAINJOB_IMAGE=image),
                          tmp_path / "h1", log)
    # Killed once MLflow holds epochs 0 and 1 (each sent once its save point is stored).
    wait_for(lambda: logged_epochs() == [0, 1], proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    result = run_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks_file(tmp_path, "h2.json",
                                                                     **STAND_IN)),
                          tmp_path / "h2")  # a new pod: empty disk, the run's tracking.json
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "resuming at epoch 2, batch 0" in result.stdout
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == stored_json(s3, bucket, prefix, "tracking.json")["run_id"]
    history = s3.read_json(bucket, f"{prefix}/history.json")
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in loss] == [0, 1, 2, 3], result.stdout[-6000:]
    assert loss == [(h["epoch"], pytest.approx(h["loss"])) for h in history]
    assert [step for step, _ in loss] == [0, 1, 2, 3], result.stdout[-6000:]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "4" and "tracking.mlflow_experiment" not in \
        run.data.params
    assert run.data.tags["trainjob.run_folder"] == f"s3://{bucket}/{prefix}"
    assert run.data.tags["trainjob.image"] == image  # the pod that started the run
    metrics = s3.read_json(bucket, f"{prefix}/metrics.json")
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.png", "confusion.png", "per_class.png"} <= artifacts
    assert "tracking.json" in s3.read_json(bucket, f"{prefix}/manifest.json")["files"]


def test_a_sigterm_is_killed_then_continued_and_a_stopped_server_changes_nothing(
        s3, bucket, dataset, tmp_path):
    server = start_mlflow(tmp_path / "mlflow")  # its own: this test stops it
    try:
        prefix = "runs/stopped-server"
        args = ["train", "--data", dataset, "--output", f"s3://{bucket}/{prefix}", "--epochs",
                "4", "--steps-per-epoch", "2", "--mlflow-tracking-uri", server.url, *SMALL]
        client = mlflow.MlflowClient(tracking_uri=server.url)

        def tracked() -> tuple[str, list[int]]:
            record = stored_json(s3, bucket, prefix, "tracking.json")
            if not record.get("run_id"):
                return "", []
            return record["run_id"], sorted(
                m.step for m in client.get_metric_history(record["run_id"], "loss"))

        # A preemption: SIGTERM while held after epoch 1. Exit 143, the MLflow run KILLED.
        log = tmp_path / "first.log"
        hooks = hooks_file(tmp_path, **STAND_IN,
                           hold={"epoch:1": {"seconds": 600, "until_signal": True}})
        proc = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks), tmp_path / "h1", log)
        wait_for(lambda: "test hook: holding at epoch:1" in log.read_text(), proc, log)
        wait_for(lambda: tracked()[1] == [0, 1], proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        run_id = tracked()[0]
        assert client.get_run(run_id).info.status == "KILLED"

        # The next pod continues the same MLflow run; then the server stops under it.
        release = tmp_path / "release"
        log2 = tmp_path / "second.log"
        hooks2 = hooks_file(tmp_path, "h2.json", **STAND_IN,
                            hold={"epoch:2": {"seconds": 600, "until_file": str(release)}})
        proc = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks2), tmp_path / "h2", log2)
        wait_for(lambda: tracked() == (run_id, [0, 1, 2]), proc, log2)
        assert client.get_run(run_id).info.status == "RUNNING"
        assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
        stop_mlflow(server)
        release.touch()
        started = time.monotonic()
        assert proc.wait(timeout=300) == 0, log2.read_text()[-3000:]
        text = log2.read_text()
        assert "MLflow" in text and "unreachable" in text, text[-3000:]
        assert stored_json(s3, bucket, prefix, "manifest.json")  # published all the same
        print(f"finished {time.monotonic() - started:.1f}s after the server stopped")
    finally:
        stop_mlflow(server)
