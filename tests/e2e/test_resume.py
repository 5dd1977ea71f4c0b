"""Resumable runs: SIGKILL, SIGTERM, a lost run lock, callback state, S3 faults, finished runs.

Real processes against a real S3 server over HTTP; faults come from a real proxy.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import SMALL, STAND_IN, point_boto3_at, run_trainjob, start_trainjob, upload_tree
from helpers.checks import (
    assert_complete_run,
    assert_each_step_once,
    assert_stock_client_pulls_the_run,
)
from helpers.faultproxy import FaultProxy
from helpers.jobs import csv_epochs, hooks_file, stored_json, wait_for

from trainjob.run.folder import LOCK
from trainjob.run.lock import RunLock
from trainjob.store import client
from trainjob.store.s3 import S3Store
from trainjob.train import eventlog

pytestmark = pytest.mark.e2e

STEPS = 6  # batches per epoch: long enough to kill inside an epoch, short enough for CI


@pytest.mark.timeout(1800)  # four runs on moto: well over the default per-test limit
def test_official_zip_killed_resumed_and_pulled(server, bucket, dataset, class_folders,
                                               tmp_path, monkeypatch):
    """The core run, on each server: the official zip, trained, stopped after two of four
    epochs, resumed by a new pod with an empty disk, then checked file by file against the
    manifest and pulled with the stock client. On moto a SIGKILL stops ResNet50; on
    SeaweedFS, whose conditional writes are real, another owner takes the run lock of the
    stand-in backbone (ResNet50's bytes) and it must go quiet and exit 6. One run serves all
    of it (the suite's time budget): the resumed run is the complete run, and its
    TensorBoard events, SavedModel and `trainjob predict` are checked on it."""
    s3 = server
    prefix = "runs/kill"
    out = f"s3://{bucket}/{prefix}"
    plain = ["train", "--data", dataset, "--output", out, "--epochs", "4",
             "--steps-per-epoch", str(STEPS), "--no-restore-best", *SMALL,
             # ResNet50 and Adam, the default, resume across the kill on moto; on SeaweedFS,
             # where the store is the subject, SGD and the stand-in backbone (same bytes).
             "--optimizer", "adam" if s3.kind == "moto" else "sgd"]
    stand_in = {} if s3.kind == "moto" else STAND_IN
    args = [*plain, "--tensorboard", "--export", "saved_model"]
    log = tmp_path / "first.log"
    # Held after epoch index 1 until the test releases it, so the stop lands at a known
    # point, once the status shows it (the lock is beaten every second for the take-over).
    release = tmp_path / "release"
    hooks = {"hold": {"epoch:1": {"seconds": 600, "until_file": str(release)}},
             **({} if s3.kind == "moto" else {"lock_heartbeat_seconds": 1, **stand_in})}
    proc = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks_file(tmp_path, **hooks)),
                          tmp_path / "home", log)
    wait_for(lambda: stored_json(s3, bucket, prefix).get("epochs_done", 0) >= 2, proc, log)
    if s3.kind == "moto":
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    else:
        _take_the_lock_from(proc, log, release, s3, bucket, prefix, monkeypatch, tmp_path)
    assert not any(k.endswith("manifest.json") for k in s3.keys(bucket, prefix + "/"))
    state = s3.read_json(bucket, f"{prefix}/backup/state.json")
    assert state["epoch"] == 2

    # A new pod: empty home, empty cache.
    cache = tmp_path / "cache2"
    env = s3.env(TRAINJOB_TEST_HOOKS=hooks_file(tmp_path, **stand_in))
    result = run_trainjob([*args, "--cache-dir", str(cache)], env, tmp_path / "home2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "resuming at epoch 2, batch 0" in result.stdout
    assert_complete_run(s3, bucket, prefix, epochs=4)
    pulled = tmp_path / "pulled"
    assert_stock_client_pulls_the_run(s3, bucket, prefix, pulled)
    history = s3.read_json(bucket, f"{prefix}/history.json")
    # The optimizer's step count carried on across the kill: 4 epochs' worth at the end, not
    # the 2 of a fresh start (each history row records it; model.keras has no optimizer).
    assert [h["iterations"] for h in history] == [STEPS * (e + 1) for e in range(4)]
    # TensorBoard: one file per split, whatever the killed process had sent; each epoch's
    # step once, with the values of the history the resumed run kept.
    assert sorted(p.relative_to(pulled).as_posix() for p in (pulled / "tensorboard").rglob("*")
                  if p.is_file()) == sorted([eventlog.TRAIN, eventlog.VALIDATION])
    events = assert_each_step_once(pulled, 4)
    assert [v for _, v in sorted(events["epoch_loss"])] == pytest.approx(
        [h["loss"] for h in history], rel=1e-5)
    config = s3.read_json(bucket, f"{prefix}/config.json")
    assert config["resumed_from_epoch"] == 2
    assert_inspection_commands_read_the_run(s3, bucket, prefix, 4, tmp_path)

    dataset_info = config["dataset"]
    assert dataset_info["download"]["objects_downloaded"] == 1
    skipped = {Path(s["path"]).name for s in dataset_info["skipped_files"]}
    assert skipped == {"truncated_0001.jpg", "empty_0001.jpg", "notes.txt"}
    assert dataset_info["converted_to_rgb"] >= 1  # the CMYK JPEG
    assert "BACKGROUND_Google" not in dataset_info["class_counts"]
    assert set(config["timings_seconds"]) >= {"download", "unpack", "scan", "pipeline",
                                              "tracing", "first_step", "train", "evaluate"}
    # Credentials never reach the run folder or the logs.
    for text in (json.dumps(config), log.read_text(), result.stdout, result.stderr):
        assert s3.secret_key not in text

    # The final model loads with plain Keras and takes raw 0-255 RGB images. It carries no
    # optimizer state: about the size of the weights alone (Adam's moments would triple it).
    import keras
    import numpy as np
    import tensorflow as tf

    import trainjob.train.model  # noqa: F401 - registers the preprocessing layer

    path = pulled / "model" / "model.keras"
    model = keras.saving.load_model(path)
    assert getattr(model, "optimizer", None) is None
    assert path.stat().st_size < 1.2 * (pulled / "checkpoints/last.weights.h5").stat().st_size
    probs = model.predict(np.full((2, 32, 32, 3), 200.0, np.float32), verbose=0)
    assert probs.shape == (2, len(dataset_info["class_counts"]))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    # --export saved_model: TF Serving's format gives the same predictions.
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    served = tf.saved_model.load(str(pulled / "model" / "saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), model.predict(x, verbose=0),
                               atol=1e-5)
    if s3.kind == "moto":  # the same files on every server: predicted once, for time
        assert_predict_agrees_with_evaluation(s3, bucket, prefix, model, class_folders,
                                              tmp_path)

    # Finished: the same command again is a no-op...
    manifest = s3.read(bucket, f"{prefix}/manifest.json")
    again = run_trainjob(args, env, tmp_path / "home2", timeout=120)
    assert again.returncode == 0
    assert "already holds a finished run" in again.stdout
    assert s3.read(bucket, f"{prefix}/manifest.json") == manifest
    if s3.kind == "moto":
        return  # what follows does the same on every server: checked once, on the stand-in

    # --overwrite trains afresh, in one run with what a second run on the same cache
    # shows: nothing is downloaded again, and it starts from the first run's best
    # checkpoint, fetched through storage (--weights URI; a copy, since --overwrite clears
    # the folder that holds the original).
    s3.client().copy_object(Bucket=bucket, Key="weights/best.weights.h5",
                            CopySource={"Bucket": bucket,
                                        "Key": f"{prefix}/checkpoints/best.weights.h5"})
    fresh = run_trainjob([*plain, "--overwrite", "--epochs", "1", "--steps-per-epoch", "2",
                          "--optimizer", "sgd", "--cache-dir", str(cache),
                          "--weights", f"s3://{bucket}/weights/best.weights.h5"],
                         env, tmp_path / "home2")
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert csv_epochs(s3, bucket, prefix) == [0]
    assert s3.read(bucket, f"{prefix}/manifest.json") != manifest
    config2 = s3.read_json(bucket, f"{prefix}/config.json")
    assert config2["dataset"]["download"]["objects_downloaded"] == 0
    assert config2["dataset"]["download"]["objects_cached"] == 1
    assert config2["settings"]["model"]["weights"].endswith("weights/best.weights.h5")


def _take_the_lock_from(proc, log: Path, release: Path, s3, bucket: str, prefix: str,
                        monkeypatch, tmp_path: Path) -> None:
    """Another owner takes a held job's run lock: once the job has noticed (its error line),
    it is released, and it must write nothing more and exit 6, one error line, status left
    "running". (test_lock_processes.py tests the lock's compare-and-swap and races with
    small processes; here it is the real job.)"""
    def etags() -> dict[str, str]:
        """Every object of the run but the lock, with its ETag."""
        out = {}
        for page in s3.client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith(LOCK):
                    out[obj["Key"]] = obj["ETag"]
        return out

    point_boto3_at(s3, monkeypatch, tmp_path)
    taker = RunLock(S3Store(bucket, prefix, threads=2))
    try:
        taker.acquire(force=True, timeout=10, poll=0.05)
        frozen = etags()
        wait_for(lambda: "lost the run lock" in log.read_text(), proc, log)
        release.touch()
        assert proc.wait(timeout=120) == 6, log.read_text()[-3000:]
        assert etags() == frozen, "the job wrote after losing the lock"
        assert RunLock(S3Store(bucket, prefix)).store.read_json(LOCK)["token"] == taker.token
    finally:
        proc.kill()
        taker.release()
        client._clients.clear()
    errors = [line for line in log.read_text().splitlines() if line.startswith("trainjob: error")]
    assert len(errors) == 1 and "lost the run lock" in errors[0], errors
    assert stored_json(s3, bucket, prefix)["state"] == "running"


def assert_predict_agrees_with_evaluation(s3, bucket: str, prefix: str, model,
                                          class_folders: Path, tmp_path: Path) -> None:
    """`trainjob predict --model <run in the bucket>` on one image of each class, the CMYK
    one and the truncated one: classes from classes.json, probabilities summing to 1, the
    truncated file reported on stderr (exit 3) while the others are predicted, and each
    top-1 equal to the model's own evaluation path (the pipeline's decode, resize, batch)."""
    from trainjob.data.catalog import Sample
    from trainjob.data.images import check_image
    from trainjob.train import inputs

    out = f"s3://{bucket}/{prefix}"
    classes = s3.read_json(bucket, f"{prefix}/classes.json")
    good = [sorted((class_folders / name).glob("image_*.jpg"))[0]
            for name in sorted(classes.values())]
    good += sorted(class_folders.glob("*/cmyk_0001.jpg"))
    (bad,) = class_folders.glob("*/truncated_0001.jpg")
    result = run_trainjob(["predict", "--model", out, *map(str, good[:2]), str(bad),
                           *map(str, good[2:]), "--top-k", str(len(classes)), "--json"],
                          s3.env(), tmp_path / "predict", timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    errors = result.error_lines()
    assert errors[0].startswith(f"trainjob: {bad}: unreadable image"), errors
    assert "1 of" in errors[-1] and len(errors) == 2, errors
    answers = json.loads(result.stdout)
    assert [a["image"] for a in answers] == [*map(str, good[:2]), str(bad), *map(str, good[2:])]
    assert answers.pop(2)["top"] == []
    (tmp_path / "converted").mkdir(exist_ok=True)
    usable = [str(check_image(p, tmp_path / "converted").usable) for p in good]
    stream = inputs.evaluation_stream(
        inputs.decoded([Sample(p, 0) for p in usable], 32, "none", tmp_path, "check"),
        len(classes), 8)
    evaluated = model.predict(stream, verbose=0)
    for answer, row in zip(answers, evaluated, strict=True):
        assert {c["class"] for c in answer["top"]} == set(classes.values())
        assert sum(c["probability"] for c in answer["top"]) == pytest.approx(1.0, abs=1e-4)
        assert answer["top"][0]["class"] == classes[str(int(row.argmax()))], answer


def assert_inspection_commands_read_the_run(s3, bucket: str, prefix: str, epochs: int,
                                           tmp_path: Path) -> None:
    """`runs list`, `runs show` and `runs download` on a run folder a real run wrote (their
    own tests use folders made by hand): the row agrees with status.json and metrics.json,
    and the download checks every file against the manifest."""
    listed = run_trainjob(["runs", "list", f"s3://{bucket}/runs/", "--json"], s3.env(),
                          tmp_path / "inspect", timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    row = {r["name"].rstrip("/"): r for r in json.loads(listed.stdout)}[prefix.split("/")[-1]]
    status = s3.read_json(bucket, f"{prefix}/status.json")
    metrics = s3.read_json(bucket, f"{prefix}/metrics.json")
    assert row["status"] == "succeeded" and row["finished"]
    assert row["epochs_done"] == status["epochs_done"] == epochs
    assert row["test_mean_per_class_accuracy"] == pytest.approx(
        metrics["mean_per_class_accuracy"])
    shown = run_trainjob(["runs", "show", f"s3://{bucket}/{prefix}"], s3.env(),
                         tmp_path / "inspect", timeout=120)
    assert shown.returncode == 0 and "val_accuracy" in shown.stdout, shown.stderr[-2000:]
    dest = tmp_path / "downloaded"
    got = run_trainjob(["runs", "download", f"s3://{bucket}/{prefix}", str(dest)], s3.env(),
                       tmp_path / "inspect", timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    manifest = s3.read_json(bucket, f"{prefix}/manifest.json")
    for name, entry in manifest["files"].items():
        assert (dest / name).stat().st_size == entry["size"], name


def test_sigterm_mid_epoch_then_late_sigterm_then_resume(s3, bucket, class_folders, tmp_path):
    """SIGTERM inside an epoch on a link too slow for its save point, then late in the
    rerun, then a third run publishes, through a faulty store and over a stale lock.

    EarlyStopping's state rides along on a scripted metric (patience 2, best at epoch 1,
    worse after): restored each time, it stops the run after epoch 3; had its wait count or
    its best been lost, the run would go on to epoch 4. The data is a prefix of class
    folders (not an archive), so the same runs check that input end to end."""
    upload_tree(s3, bucket, class_folders, "caltech/101_ObjectCategories/")
    out = f"s3://{bucket}/runs/term"
    args = ["train", "--data", f"s3://{bucket}/caltech/", "--output", out, "--epochs", "5",
            "--steps-per-epoch", str(STEPS), "--backup-every-steps", "2", "--no-restore-best",
            "--early-stopping-monitor", "scripted", "--early-stopping-mode", "min",
            "--early-stopping-patience", "2", *SMALL]
    scripted = {"scripted": [1.0, 0.5, 0.6, 0.7, 0.8]}
    log = tmp_path / "first.log"
    # Held in epoch 1 after batch 4 (its save point after batch 2 is made), until the
    # signal: the signal lands mid-epoch whatever the machine's speed.
    hooks = hooks_file(tmp_path, metrics=scripted, **STAND_IN,
                   hold={"batch:1:4": {"seconds": 600, "until_signal": True}})
    with FaultProxy(s3.endpoint) as link:
        env = s3.env(AWS_ENDPOINT_URL=link.endpoint, TRAINJOB_TEST_HOOKS=hooks)
        proc = start_trainjob([*args, "--grace-seconds", "10"], env, tmp_path / "home", log)
        wait_for(lambda: "test hook: holding at batch:1:4" in log.read_text(), proc, log)

        # While it runs, a second job on the same output waits for the lock, then gives up.
        other = run_trainjob([*args, "--lock-timeout", "3"], s3.env(), tmp_path / "other",
                             timeout=120)
        assert other.returncode == 2, other.stderr
        assert len(other.error_lines()) == 1 and "run.lock.json" in other.error_lines()[0]

        # Once the save point after batch 2 is in the bucket (the rerun resumes there, so
        # little training is lost), the link turns too slow for checkpoints (small
        # requests still pass): the stop's own save point cannot go up in its grace period.
        wait_for(lambda: (lambda s: (s.get("epoch"), s.get("step")) == (1, 2))(
            stored_json(s3, bucket, "runs/term", "backup/state.json")), proc, log)
        link.stall_bodies_over = 2**20
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - started
    assert rc == 143, log.read_text()[-3000:]
    assert elapsed < 10 + 2, f"took {elapsed:.1f}s with --grace-seconds 10"
    assert "grace period over before all uploads finished" in log.read_text()
    assert "trainjob: error: stopped by signal in epoch 1 after batch 4" in log.read_text()
    # The status the bucket holds still gets its small write: preempted, not running.
    status = s3.read_json(bucket, "runs/term/status.json")
    assert status["state"] == "preempted", status
    state = s3.read_json(bucket, "runs/term/backup/state.json")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert not any(k.endswith("run.lock.json") for k in s3.keys(bucket, "runs/term/"))

    # The rerun resumes exactly at the save point the bucket holds. A second SIGTERM lands
    # late in it, right after epoch 2 is saved: that one used to be ignored, and the job
    # went on to evaluate and publish. It must stop there, with 143, before publishing.
    log2 = tmp_path / "second.log"
    env2 = s3.env(TRAINJOB_TEST_HOOKS=hooks_file(
        tmp_path, metrics=scripted, **STAND_IN,
        hold={"epoch:2": {"seconds": 600, "until_signal": True}}))
    proc = start_trainjob(args, env2, tmp_path / "home", log2)
    wait_for(lambda: "test hook: holding at epoch:2" in log2.read_text(), proc, log2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log2.read_text()[-3000:]
    assert f"resuming at epoch {state['epoch']}, batch {state['step']}" in log2.read_text()
    stopped = s3.read_json(bucket, "runs/term/status.json")
    assert (stopped["state"], stopped["error"]) == ("preempted", "stopped by signal after "
                                                    "epoch 2"), stopped
    assert not any(k.endswith("manifest.json") for k in s3.keys(bucket, "runs/term/"))
    # Epoch 1 was the best (0.5), epoch 2 worse: one epoch of patience used, kept in the bucket.
    saved = s3.read_json(bucket, "runs/term/backup/state.json")["callbacks"]
    assert saved["EarlyStopping:"]["wait"] == 1 and saved["EarlyStopping:"]["best"] == 0.5

    # A third run, a new pod (it downloads the prefix again, object by object), publishes
    # from the saved state: epoch 3 uses the last of the patience, and the run stops there.
    # It goes through a faulty store (20% of requests get 503 SlowDown, 5% lose the
    # connection mid-body), and takes over a stale lock from a pod gone an hour ago.
    s3.client().put_object(Bucket=bucket, Key="runs/term/run.lock.json", Body=json.dumps({
        "host": "gone-pod", "pid": 1, "token": "x", "started": time.time() - 7200,
        "heartbeat": time.time() - 3600}).encode())
    with FaultProxy(s3.endpoint, slowdown=0.20, drop=0.05, seed=1) as proxy:
        hooks = hooks_file(tmp_path, metrics=scripted, **STAND_IN)
        result = run_trainjob(args, s3.env(AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="10",
                                           TRAINJOB_TEST_HOOKS=hooks), tmp_path / "home2")
        injected = proxy.injected
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert injected["slowdown"] > 5 and injected["drop"] > 0, injected
    assert "taking over the run lock" in result.stdout
    assert csv_epochs(s3, bucket, "runs/term") == [0, 1, 2, 3]
    assert_complete_run(s3, bucket, "runs/term", epochs=4)
    config = s3.read_json(bucket, "runs/term/config.json")
    assert config["dataset"]["download"]["objects_downloaded"] > 40
    # Mid-epoch or not, the optimizer saw each of the 4 x STEPS batches exactly once: its
    # step count at each epoch end, as the history records it (model.keras has no optimizer).
    history = s3.read_json(bucket, "runs/term/history.json")
    assert [h["iterations"] for h in history] == [STEPS, 2 * STEPS, 3 * STEPS, 4 * STEPS]


def test_second_sigterm_exits_at_once(s3, bucket, dataset, tmp_path):
    """The second signal exits at once, even while the first step holds the main thread
    (a first trace can take minutes): the signal watchdog's thread ends the process."""
    args = ["train", "--data", dataset, "--output", f"s3://{bucket}/runs/term2",
            "--epochs", "3", "--steps-per-epoch", "50", *SMALL]
    log = tmp_path / "job.log"
    hooks = hooks_file(tmp_path, **STAND_IN, hold={"first_step": 600})
    proc = start_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks), tmp_path / "home", log)
    wait_for(lambda: "test hook: holding at first_step" in log.read_text(), proc, log)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert time.monotonic() - started < 5


def test_uploads_failing_after_retries_exit_4_and_keep_local_files(s3, bucket, dataset, tmp_path):
    """The endpoint dies mid-run: status failed, exit 4, the local run folder keeps it all."""
    with FaultProxy(s3.endpoint, slowdown=0.0, drop=0.0, seed=2) as proxy:
        args = ["train", "--data", dataset, "--output", f"s3://{bucket}/runs/dead",
                "--epochs", "3", "--steps-per-epoch", "2", "--upload-timeout", "15", *SMALL]
        log = tmp_path / "job.log"
        release = tmp_path / "release"
        env = s3.env(AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="2",
                     TRAINJOB_TEST_HOOKS=hooks_file(tmp_path, **STAND_IN, hold={"epoch:0": {
                         "seconds": 600, "until_file": str(release)}}))
        proc = start_trainjob(args, env, tmp_path / "home", log)
        wait_for(lambda: "test hook: holding at epoch:0" in log.read_text(), proc, log)
        proxy.fail_everything()  # the endpoint dies after the first epoch
        release.touch()
        rc = proc.wait(timeout=600)
    text = log.read_text()
    assert rc == 4, text[-3000:]
    assert "trainjob: error:" in text
    runs = list((tmp_path / "home" / "work" / "runs").iterdir())
    assert len(runs) == 1
    local = runs[0]
    assert json.loads((local / "status.json").read_text())["state"] == "failed"
    assert (local / "backup" / "state.json").exists()
    assert (local / "training_log.csv").exists()
    assert not any(k.endswith("manifest.json") for k in s3.keys(bucket, "runs/dead/"))
