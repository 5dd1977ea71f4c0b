"""job.py's own decisions, without training: what a rerun continues from, what it pulls
from the bucket, when it does nothing, and that a published run is never touched again.
Regression tests for the ways a run used to be lost (see docs/architecture.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.runs import cfg_for, started_run

from trainjob import job
from trainjob.data.catalog import Catalog, Dataset, Sample, split
from trainjob.errors import ConfigError, Preempted, StorageError
from trainjob.run import configfile, resumption, savepoints, stop
from trainjob.run.folder import (
    CLASSES,
    CONFIG,
    HISTORY,
    LAST,
    LOCK,
    LOG_CSV,
    MANIFEST,
    STATUS,
    RunFolder,
    read_json,
    sha256,
    write_json,
)
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store

# --- a broken resume pair never deletes the run (defect 1) ---------------------------------

def test_unusable_resume_state_stops_with_one_line_and_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, LocalStore(out)) as run:
        started_run(run, 2)
        for weights in run.path("backup").glob("*.weights.h5"):
            weights.write_bytes(b"not what the record says")
        before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        with pytest.raises(ConfigError) as err:
            resumption.prepare(cfg_for(str(out), tmp_path), run)
    assert "nothing was deleted" in str(err.value) and "--overwrite" in str(err.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before


def test_a_broken_newest_pair_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, LocalStore(out)) as run:
        started_run(run, 3)
        run.path("backup/state-000003.weights.h5").write_bytes(b"torn")
        state = resumption.prepare(cfg_for(str(out), tmp_path), run)
    assert state["epoch"] == 2
    assert (out / LOG_CSV).exists() and (out / "checkpoints/best.weights.h5").exists()


def test_without_any_pair_the_last_checkpoint_is_used(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, LocalStore(out)) as run:
        started_run(run, 2, fingerprint_of(tmp_path))
        for pair in run.path("backup").glob("state-*"):
            pair.write_bytes(b"garbage")
        run.path(LAST).write_bytes(b"last")
        state = resumption.prepare(cfg_for(str(out), tmp_path), run)
    assert state["from_checkpoint"] == LAST and state["epoch"] == 2


def _broken_but_for_last(run: RunFolder, keep: str) -> None:
    """No usable save point, only checkpoints/last.weights.h5; of what records the settings,
    only ``keep``: "records" (their weights are torn), "config" (config.json's fingerprint)
    or "settings" (config.json as an older trainjob wrote it, and classes.json)."""
    for pair in run.path("backup").glob("state*"):
        if keep != "records" or pair.name.endswith(".weights.h5"):
            pair.write_bytes(b"garbage")
    config = read_json(run.path(CONFIG))
    if keep == "settings":
        del config["fingerprint"]
    if keep in ("config", "settings"):
        write_json(run.path(CONFIG), config)
    else:
        run.path(CONFIG).unlink()
    run.path(LAST).write_bytes(b"last")


@pytest.mark.parametrize("keep", ["records", "config", "settings"])
def test_the_last_checkpoint_fallback_checks_the_settings_like_any_resume(tmp_path, keep):
    """A resume from checkpoints/last.weights.h5 alone used to skip the check: a changed
    --seed or split went through silently, and test images could leak into training."""
    out = tmp_path / "run"
    cfg, started = cfg_for(str(out), tmp_path), fingerprint_of(tmp_path)
    with RunFolder(out, LocalStore(out)) as run:
        run.write(CLASSES, {"0": "a", "1": "b", "2": "c"})
        configfile.RunRecord(run, cfg, fingerprint=started).write()
        started_run(run, 2, started)
        _broken_but_for_last(run, keep)
        state = resumption.prepare(cfg, run)
    assert state["from_checkpoint"] == LAST and state["epoch"] == 2
    if keep == "settings":  # a config.json without a fingerprint: an older trainjob's run,
        with pytest.raises(ConfigError, match="the input pipeline"):  # on the first pipeline
            savepoints.check_compatible(state, fingerprint_of(tmp_path))
        state["fingerprint"]["input_pipeline"] = savepoints.INPUT_PIPELINE  # to go on below
    savepoints.check_compatible(state, fingerprint_of(tmp_path))  # the same settings: fine
    for option, value, named in [("seed", 7, "--seed"), ("val_fraction", 0.3, "--val-fraction")]:
        with pytest.raises(ConfigError) as err:
            savepoints.check_compatible(state, fingerprint_of(tmp_path, **{option: value}))
        assert named in str(err.value) and err.value.exit_code == 2
    with pytest.raises(ConfigError, match="the class list"):
        renamed = Catalog(Path("/x"), ["a", "b", "z"], catalog().samples)
        savepoints.check_compatible(state, fingerprint_of(tmp_path, renamed))
    if keep != "settings":  # the images of each split are in a fingerprint, not in settings
        with pytest.raises(ConfigError, match="the dataset's images"):
            savepoints.check_compatible(state, fingerprint_of(tmp_path, catalog(19)))


def test_the_last_checkpoint_fallback_with_no_record_of_the_settings_refuses(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, LocalStore(out)) as run:
        configfile.RunRecord(run, cfg_for(str(out), tmp_path), fingerprint={}).write()
        started_run(run, 2, fingerprint_of(tmp_path))
        _broken_but_for_last(run, "none")
        before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        with pytest.raises(ConfigError) as err:
            resumption.prepare(cfg_for(str(out), tmp_path), run)
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert "--seed" in message and "--overwrite" in message and "nothing was deleted" in message
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before


# --- only the run's own entries come back from the bucket (defect 3) ---------------------

def test_keys_outside_the_run_entries_are_never_downloaded(s3env, s3, bucket, tmp_path):
    escape = tmp_path / "outside" / "bashrc"
    client = s3.client()
    for key in (f"runs/exp1//{escape}", "runs/exp1/notes/other-team.txt",
                "runs/exp1/model/model.keras"):
        client.put_object(Bucket=bucket, Key=key, Body=b"not trainjob's")
    output = f"s3://{bucket}/runs/exp1"
    cfg = cfg_for(output, tmp_path)
    with RunFolder(resumption.local_folder(cfg), S3Store(bucket, "runs/exp1")) as run:
        started_run(run, 1)
    resumption.clear_local(resumption.local_folder(cfg))
    with RunFolder(resumption.local_folder(cfg), S3Store(bucket, "runs/exp1")) as run:
        state = resumption.prepare(cfg, run)
        local = sorted(p.relative_to(run.local).as_posix() for p in run.local.rglob("*")
                       if p.is_file() and ".staging-" not in str(p))
    assert state["epoch"] == 1
    assert not escape.exists()
    assert local == ["backup/state-000001.json", "backup/state-000001.weights.h5",
                     "backup/state.json", "checkpoints/best.weights.h5", HISTORY, STATUS,
                     LOG_CSV]


def test_a_key_that_climbs_out_of_a_run_entry_is_refused(s3env, s3, bucket, tmp_path):
    output = f"s3://{bucket}/runs/exp2"
    cfg = cfg_for(output, tmp_path)
    s3.client().put_object(Bucket=bucket, Key="runs/exp2/backup/../../../../escaped", Body=b"x")
    # The premise, asserted (the only test of this refusal in the download path): the
    # server (moto) keeps the key as it is, as test_storage's cache-folder twin asserts.
    assert "runs/exp2/backup/../../../../escaped" in s3.keys(bucket, "runs/exp2/")
    with RunFolder(resumption.local_folder(cfg), S3Store(bucket, "runs/exp2")) as run:
        with pytest.raises(StorageError, match="escapes the local folder"):
            run.pull()
    assert not list(tmp_path.rglob("escaped")) and not (tmp_path.parent / "escaped").exists()


def test_a_bucket_root_output_pulls_only_the_run(s3env, s3, bucket, tmp_path):
    client = s3.client()
    for i in range(30):
        client.put_object(Bucket=bucket, Key=f"datasets/caltech/{i}.jpg", Body=b"jpeg")
    cfg = cfg_for(f"s3://{bucket}", tmp_path)
    with RunFolder(resumption.local_folder(cfg), S3Store(bucket, "")) as run:
        started_run(run, 1)
    resumption.clear_local(resumption.local_folder(cfg))
    with RunFolder(resumption.local_folder(cfg), S3Store(bucket, "")) as run:
        assert resumption.prepare(cfg, run)["epoch"] == 1
        assert not run.path("datasets").exists()
        resumption.remove_run(run)  # --overwrite removes trainjob's entries and nothing else
    assert len(s3.keys(bucket, "datasets/")) == 30
    assert not s3.keys(bucket, "backup/") and not s3.keys(bucket, STATUS)


# --- a job that waited for the lock does not retrain a finished run (defect 2) -----------

def test_a_job_that_waited_for_the_lock_finds_the_run_finished(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_json(out / LOCK, {"token": "other", "host": socket.gethostname(),
                                "pid": holder.pid, "owner": "", "started": time.time(),
                                "heartbeat": time.time()})

        def finish_and_release() -> None:  # job A publishes while B waits
            time.sleep(1.0)
            write_json(out / MANIFEST, {"files": {}})
            (out / LOCK).unlink()

        threading.Thread(target=finish_and_release, daemon=True).start()
        with caplog.at_level("INFO"):
            job.run(cfg_for(str(out), tmp_path))  # --data does not exist: training would fail
    finally:
        holder.kill()
    assert "already holds a finished run" in caplog.text
    assert read_json(out / MANIFEST) == {"files": {}}
    assert not (out / STATUS).exists()


# --- the manifest is final (defect 6) -----------------------------------------------------

class NoDeleteStore(LocalStore):
    def delete(self, keys: list[str]) -> None:
        raise StorageError("DeleteObjects refused")


def test_nothing_changes_the_run_after_its_manifest(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def train_publish_then_signal(cfg, run_dir, *args) -> None:
        started_run(run_dir, 1)
        run_dir.set_status("succeeded", error=None)
        run_dir.publish(timeout=10)
        raise Preempted("stopped by SIGTERM during the final flush")

    monkeypatch.setattr(job, "_train", train_publish_then_signal)
    cfg = cfg_for(str(out), tmp_path)
    with RunFolder(tmp_path / "run", NoDeleteStore(out)) as run:
        job._run_locked(cfg, run, lock=None, stop=stop.StopSignal())  # exits 0
    manifest = read_json(out / MANIFEST)
    assert read_json(out / STATUS)["state"] == "succeeded"
    assert manifest["files"][STATUS]["sha256"] == sha256(out / STATUS)
    assert (out / "backup").exists()  # its removal failed, and that was not fatal


def test_a_resumed_run_keeps_the_start_of_its_first_attempt(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "_train", lambda *args: None)
    out = tmp_path / "out"
    cfg = cfg_for(str(out), tmp_path)
    with RunFolder(out, LocalStore(out)) as run:
        started_run(run, 1)
        run.set_status("preempted", started=1000.0)
        job._run_locked(cfg, run, lock=None, stop=stop.StopSignal())
        status = read_json(run.path(STATUS))
    assert status["first_started"] == 1000.0 and status["started"] > 1000.0
    fresh = tmp_path / "fresh"
    with RunFolder(fresh, LocalStore(fresh)) as run:
        job._run_locked(cfg_for(str(fresh), tmp_path), run, lock=None,
                        stop=stop.StopSignal())
        status = read_json(run.path(STATUS))
    assert status["first_started"] == status["started"]


# --- resume checks every setting that shapes the run (defect 5) ----------------------------

def catalog(n_per_class: int = 20) -> Catalog:
    samples = [Sample(f"/x/c{c}/{i}.jpg", c) for c in range(3) for i in range(n_per_class)]
    return Catalog(Path("/x"), ["a", "b", "c"], samples)


def fingerprint_of(tmp_path: Path, cat: Catalog | None = None, **options) -> dict:
    cfg = cfg_for("/out", tmp_path, **options)
    cat = cat or catalog()
    splits = split(cat, val_fraction=cfg.split.val_fraction, test_fraction=cfg.split.test_fraction,
                   train_per_class=cfg.split.train_per_class, seed=cfg.split.seed)
    return savepoints.fingerprint(cfg, Dataset(cat, splits, {}))


@pytest.mark.parametrize("option, value, named", [
    ("seed", 7, "--seed"), ("val_fraction", 0.3, "--val-fraction"),
    ("test_fraction", 0.05, "--test-fraction"), ("train_per_class", 5, "--train-per-class"),
    ("batch_size", 16, "--batch-size"), ("steps_per_epoch", 3, "--steps-per-epoch"),
    ("image_size", 64, "--image-size"),
])
def test_resume_refuses_a_changed_setting_and_names_it(tmp_path, option, value, named):
    saved = {"fingerprint": fingerprint_of(tmp_path)}
    savepoints.check_compatible(saved, fingerprint_of(tmp_path))  # unchanged: fine
    with pytest.raises(ConfigError) as err:
        savepoints.check_compatible(saved, fingerprint_of(tmp_path, **{option: value}))
    assert named in str(err.value) and err.value.exit_code == 2


def test_resume_refuses_changed_data(tmp_path):
    saved = {"fingerprint": fingerprint_of(tmp_path)}
    with pytest.raises(ConfigError, match="the dataset's images"):
        savepoints.check_compatible(saved, fingerprint_of(tmp_path, catalog(19)))


def test_settings_an_older_version_did_not_record_are_not_checked(tmp_path):
    old = {"fingerprint": {"image_size": 224, "optimizer": "adam", "input_pipeline": 2,
                           "classes": fingerprint_of(tmp_path)["classes"]}}
    savepoints.check_compatible(old, fingerprint_of(tmp_path, seed=9, image_size=224))


@pytest.mark.parametrize("saved", [{"input_pipeline": 1}, {}, None])
def test_resume_refuses_a_run_started_on_another_input_pipeline(tmp_path, saved):
    """A run that began on the first input pipeline (which recorded no version: the key is
    missing, or the whole fingerprint, in records of older releases) must not go on with
    other training images; the check skips every other key an older record lacks."""
    current = fingerprint_of(tmp_path)
    assert current["input_pipeline"] == savepoints.INPUT_PIPELINE == 2
    started = {**current, **saved} if saved is not None else None
    if saved == {}:
        del started["input_pipeline"]
    with pytest.raises(ConfigError, match="the input pipeline") as err:
        savepoints.check_compatible({"fingerprint": started}, current)
    assert err.value.exit_code == 2 and "trainjob release" in str(err.value)
    savepoints.check_compatible({"fingerprint": current}, current)  # the same pipeline: fine


@pytest.mark.parametrize("options, code, named", [
    (["--test-fraction", "0"], 2, "--test-fraction 0"),
    ([], 3, "fewer than 3 images"),
])
def test_an_empty_test_split_fails_before_training_with_one_line(tmp_path, monkeypatch,
                                                                 options, code, named):
    """The final model is scored on the test split: none is exit 2 or 3 in a second, not a
    TensorFlow error after the whole training (a bug found by the first-step benchmark)."""
    import sampledata

    from trainjob.cli import main

    for name in [k for k in os.environ if k.startswith("TRAINJOB_")]:
        monkeypatch.delenv(name)
    data = tmp_path / "data"
    sampledata.make_class_folders(data, classes=3, per_class=2 if not options else 6,
                                  background=False)
    out = tmp_path / "run"
    monkeypatch.setenv("TRAINJOB_HOME", str(tmp_path / "home"))
    assert main(["train", "--data", str(data), "--output", str(out), *options]) == code
    status = read_json(out / STATUS)
    assert status["state"] == "failed" and named in status["error"], status
    assert not (out / MANIFEST).exists()
