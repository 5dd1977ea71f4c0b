"""``trainjob runs``: list, show, download against run folders made by hand on moto_server.

The in-process tests invoke the click group (boto3 pointed at the server, nothing mocked);
the subprocess tests check exit codes, the one-line errors and that TensorFlow is never
imported.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from click.testing import CliRunner
from conftest import make_bucket, point_boto3_at, run_trainjob
from helpers import runfolders
from helpers.faultproxy import FaultProxy
from helpers.jobs import cli_in_subprocess

from trainjob.cli import cli
from trainjob.inspect import runinfo
from trainjob.store.s3 import S3Store

NOW = time.time()  # for pure functions given `now`; anything the CLI reads uses the clock


MADE: dict[str, float] = {}  # bucket -> when runs_bucket made its runs


@pytest.fixture
def runs_bucket(s3env, s3, bucket):
    """finished, failed, running (fresh heartbeat), stale (old heartbeat), and a non-run.
    Times are relative to now, the clock the CLI reads (not collection time: under xdist a
    test may run many minutes after collection)."""
    made = MADE[bucket] = time.time()
    client = s3.client()
    runfolders.finished_run(client, bucket, "runs/done", now=made)
    runfolders.failed_run(client, bucket, "runs/failed", now=made)
    runfolders.running_run(client, bucket, "runs/live", heartbeat_age=5, now=made)
    runfolders.running_run(client, bucket, "runs/stale", heartbeat_age=3600, now=made)
    client.put_object(Bucket=bucket, Key="runs/notes/readme.txt", Body=b"not a run")
    return bucket


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_list_summarizes_each_kind_of_run(runs_bucket):
    # Ages read at the moment the runs were made: exact, however loaded the machine is.
    rows = {r.name: r for r in runinfo.summarize_runs(
        S3Store(runs_bucket, "runs", threads=4), threads=4, now=MADE[runs_bucket])}
    assert sorted(rows) == ["done", "failed", "live", "stale"]  # notes/ holds no run
    done, failed, live, stale = rows["done"], rows["failed"], rows["live"], rows["stale"]
    assert (done.status, done.finished, done.epochs_done, done.epochs_planned) == \
        ("succeeded", True, 5, 5)
    assert done.best_val_accuracy == pytest.approx(0.58)
    assert done.test_mean_per_class_accuracy == pytest.approx(0.6)
    assert done.duration_seconds == pytest.approx(3540)
    assert done.heartbeat_age_seconds is None
    assert (failed.status, failed.epochs_done, failed.epochs_planned) == ("failed", 2, 10)
    assert failed.duration_seconds == pytest.approx(300, abs=1)
    assert failed.error == "the loss became NaN at epoch 2"
    assert failed.test_mean_per_class_accuracy is None
    assert (live.status, live.epochs_done, live.epochs_planned) == ("running", 3, 20)
    assert live.heartbeat_age_seconds == pytest.approx(5, abs=1)
    assert live.duration_seconds == pytest.approx(905, abs=1)
    assert stale.status == "stale"
    assert stale.duration_seconds == pytest.approx(900, abs=1)  # up to its last heartbeat
    assert stale.heartbeat_age_seconds == pytest.approx(3600, abs=1)


def test_list_table_and_json(runs_bucket):
    result = invoke("runs", "list", f"s3://{runs_bucket}/runs/")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert lines["RUN"].split()[:3] == ["RUN", "STATUS", "EPOCHS"]
    assert "succeeded" in lines["done"] and "5/5" in lines["done"] and "0.5800" in lines["done"]
    assert "failed" in lines["failed"] and "2/10" in lines["failed"]
    assert "running" in lines["live"] and "ago" in lines["live"]
    assert "stale" in lines["stale"] and "(stale)" in lines["stale"]
    assert "notes" not in lines

    result = invoke("runs", "list", "--json", f"s3://{runs_bucket}/runs/")
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["live"]["status"] == "running" and rows["stale"]["status"] == "stale"
    assert rows["done"]["uri"] == f"s3://{runs_bucket}/runs/done"


def test_list_reads_only_small_json_files(s3, runs_bucket, monkeypatch, tmp_path):
    """Through a counting proxy: one listing, GETs of the summary JSONs, a HEAD of each
    manifest; never a weights file, a CSV or a listing of a run's contents."""
    with FaultProxy(s3.endpoint) as proxy:
        point_boto3_at(s3, monkeypatch, tmp_path, AWS_ENDPOINT_URL=proxy.endpoint)
        rows = runinfo.summarize_runs(S3Store(runs_bucket, "runs", threads=4), threads=4)
        seen = proxy.requests
    assert len(rows) == 4
    gets = [path for method, path in seen if method == "GET" and "list-type" not in path]
    listings = [path for method, path in seen if "list-type" in path]
    assert len(listings) == 1 and "delimiter=%2F" in listings[0]
    assert gets and all(path.endswith(".json") for path in gets)
    assert {path.rsplit("/", 1)[1] for method, path in seen if method == "HEAD"} == \
        {"manifest.json"}
    assert len(seen) == 1 + 5 * len(runinfo.SUMMARY_FILES + ("manifest.json",))


def test_list_reads_runs_in_parallel(s3env, s3, bucket):
    """Many runs: the files are read by a pool, several requests in flight at once."""
    client = s3.client()
    for i in range(30):
        runfolders.put_json(client, bucket, f"runs/r{i:03d}/status.json",
                            {"state": "failed", "started": NOW - 10, "epochs_done": 1})
    store = S3Store(bucket, "runs", threads=8)
    in_flight, peak, guard = [0], [0], threading.Lock()
    read_json = store.read_json

    def counting(key):
        with guard:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return read_json(key)
        finally:
            with guard:
                in_flight[0] -= 1

    store.read_json = counting
    rows = runinfo.summarize_runs(store, threads=8)
    assert len(rows) == 30 and {r.status for r in rows} == {"failed"}
    assert peak[0] > 1


def test_list_an_empty_prefix_says_so(s3env, bucket):
    result = CliRunner().invoke(cli, ["runs", "list", f"s3://{bucket}/nothing/"])
    assert result.exit_code == 0
    assert "no run folders" in result.output


def test_list_on_a_run_folder_points_at_show(runs_bucket):
    result = invoke("runs", "list", f"s3://{runs_bucket}/runs/done")
    assert "is itself a run folder: see 'trainjob runs show" in result.stderr


def test_list_never_imports_tensorflow(s3, runs_bucket, tmp_path):
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "runs", "list",
                                            f"s3://{runs_bucket}/runs/")
    assert rc == 0, err
    assert "done" in out and heavy == []


def test_compare_imports_matplotlib_only_for_its_picture(s3, runs_bucket, tmp_path):
    """`runs compare` loads neither TensorFlow, Keras nor matplotlib; --plot loads
    matplotlib, and still not TensorFlow or Keras."""
    prefix = f"s3://{runs_bucket}/runs/"
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "runs", "compare", prefix)
    assert rc == 0, err
    assert "done" in out and "stale" in out and heavy == []
    picture = tmp_path / "curves.png"
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "runs", "compare", prefix,
                                            "--plot", str(picture))
    assert rc == 0, err
    assert heavy == ["matplotlib"] and picture.stat().st_size > 0


def test_list_a_missing_bucket_is_one_line_and_exit_4(s3, tmp_path):
    result = run_trainjob(["runs", "list", "s3://no-such-bucket-here/runs/"], s3.env(),
                          tmp_path)
    assert result.returncode == 4
    assert result.error_lines() == [result.error_lines()[0]]
    assert "no-such-bucket-here" in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_point_at_the_command_help(s3, tmp_path):
    result = run_trainjob(["runs", "list"], s3.env(), tmp_path)
    assert result.returncode == 2
    assert "trainjob runs list --help" in result.stderr


def test_list_a_local_folder_of_runs(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "status.json").write_text(json.dumps(
        {"state": "succeeded", "started": NOW - 100, "finished": NOW, "epochs_done": 3}))
    (tmp_path / "runs" / "a" / "manifest.json").write_text("{}")
    (tmp_path / "runs" / "empty").mkdir()
    result = invoke("runs", "list", "--json", str(tmp_path / "runs"))
    rows = json.loads(result.stdout)
    assert [(r["name"], r["status"], r["finished"]) for r in rows] == [("a", "succeeded", True)]
    missing = CliRunner().invoke(cli, ["runs", "list", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no such folder" in str(missing.exception)


# --- runs show ---------------------------------------------------------------------------

def test_show_a_finished_run(runs_bucket):
    result = invoke("runs", "show", f"s3://{runs_bucket}/runs/done")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "succeeded" in out and "unfinished" not in out
    assert "mean_per_class_accuracy  0.6000" in out
    assert "optim.epochs         5" in out and "model.weights        imagenet" in out
    log_lines = out.split("Training log (5 epochs)\n", 1)[1].splitlines()
    assert log_lines[0].split() == ["epoch", "accuracy", "loss", "lr", "val_accuracy",
                                    "val_loss"]
    assert log_lines[5].split()[:2] == ["4", "0.6000"]
    assert "val_accuracy  ▁▃▄▆█  0.1000 -> 0.5800, best 0.5800 at epoch 4" in out
    worst = out.split("Lowest test accuracy (5 classes)\n", 1)[1].splitlines()[1:6]
    assert [line.split()[0] for line in worst] == ["beaver", "bass", "barrel", "ant", "anchor"]
    assert "confusions: not recorded" in out


def test_show_json_and_confusions_when_metrics_has_a_matrix(s3env, s3, bucket):
    client = s3.client()
    runfolders.finished_run(client, bucket, "runs/cm")
    metrics = json.loads(s3.read(bucket, "runs/cm/metrics.json"))
    n = len(runfolders.CLASSES)
    matrix = [[10 if t == p else 0 for p in range(n)] for t in range(n)]
    matrix[2][3], matrix[5][4], matrix[0][6] = 7, 4, 1
    runfolders.put_json(client, bucket, "runs/cm/metrics.json",
                        {**metrics, "confusion_matrix": matrix})
    result = invoke("runs", "show", "--json", f"s3://{bucket}/runs/cm")
    details = json.loads(result.stdout)
    assert details["confusions"] == [
        {"true": "anchor", "predicted": "ant", "count": 7},
        {"true": "bass", "predicted": "barrel", "count": 4},
        {"true": "accordion", "predicted": "beaver", "count": 1}]
    assert details["summary"]["status"] == "succeeded"
    assert [row["epoch"] for row in details["log"]] == [0, 1, 2, 3, 4]
    assert details["settings"]["optim.batch_size"] == 32
    text = invoke("runs", "show", f"s3://{bucket}/runs/cm").output
    confusions = text.split("Most frequent confusions\n", 1)[1].splitlines()
    assert confusions[1].split() == ["anchor", "ant", "7"]


def test_show_a_running_and_a_stale_run(runs_bucket):
    live = invoke("runs", "show", f"s3://{runs_bucket}/runs/live").output
    assert "running (no manifest.json: unfinished)" in live
    assert "node-7 pid 4242, heartbeat" in live and "(stale)" not in live
    stale = invoke("runs", "show", f"s3://{runs_bucket}/runs/stale").output
    assert "stale (no manifest.json: unfinished)" in stale and "1h00m ago (stale)" in stale
    failed = invoke("runs", "show", f"s3://{runs_bucket}/runs/failed").output
    assert "error     the loss became NaN at epoch 2" in failed


def test_show_a_folder_without_a_run_is_exit_2_without_tensorflow(s3, runs_bucket, tmp_path):
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "runs", "show",
                                            f"s3://{runs_bucket}/runs/notes")
    assert rc == 2 and heavy == []
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds no run" in lines[0] and "runs/notes" in lines[0]


# --- runs download -----------------------------------------------------------------------

def tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_download_checks_every_file_against_the_manifest(s3env, s3, bucket, tmp_path):
    blobs = runfolders.finished_run(s3.client(), bucket, "runs/done")
    result = invoke("runs", "download", f"s3://{bucket}/runs/done", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert f"downloaded {len(blobs)} files" in result.output
    assert "checked against manifest.json" in result.output
    assert tree(tmp_path / "out") == blobs  # no manifest, lock, backup or temporaries

    again = invoke("runs", "download", f"s3://{bucket}/runs/done", str(tmp_path / "out"))
    assert f"downloaded 0 files (0 B), {len(blobs)} already there" in again.output


def test_download_only_some_groups(s3env, s3, bucket, tmp_path):
    runfolders.finished_run(s3.client(), bucket, "runs/done")
    invoke("runs", "download", "--only", "model,checkpoints", f"s3://{bucket}/runs/done",
           str(tmp_path / "a"))
    assert sorted(tree(tmp_path / "a")) == ["checkpoints/best.weights.h5",
                                            "checkpoints/last.weights.h5", "model/model.keras"]
    invoke("runs", "download", "--only", "logs", f"s3://{bucket}/runs/done",
           str(tmp_path / "b"))
    assert sorted(tree(tmp_path / "b")) == [
        "classes.json", "config.json", "history.json", "history.png", "metrics.json",
        "status.json", "training_log.csv"]
    bad = CliRunner().invoke(cli, ["runs", "download", "--only", "weights",
                                   f"s3://{bucket}/runs/done", str(tmp_path / "c")])
    assert bad.exit_code != 0 and "unknown group weights" in str(bad.exception)


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_a_tampered_object_is_named_and_exit_4(s3, bucket, tmp_path, same_size):
    client = s3.client()
    blobs = runfolders.finished_run(client, bucket, "runs/done")
    original = blobs["checkpoints/best.weights.h5"]
    evil = b"X" * len(original) if same_size else original + b"!"
    client.put_object(Bucket=bucket, Key="runs/done/checkpoints/best.weights.h5", Body=evil)
    out = tmp_path / "out"
    result = run_trainjob(["runs", "download", f"s3://{bucket}/runs/done", str(out)],
                          s3.env(), tmp_path / "home")
    assert result.returncode == 4
    [line] = result.error_lines()
    assert "checkpoints/best.weights.h5" in line and "manifest" in line
    assert ("sha256" if same_size else "size") in line
    got = tree(out)
    assert "checkpoints/best.weights.h5" not in got  # never under its name, nor a temporary
    assert not any(name.endswith(".download") for name in got)
    assert got["model/model.keras"] == blobs["model/model.keras"]  # the rest is there


def test_an_unfinished_run_needs_allow_unfinished(s3, bucket, tmp_path):
    runfolders.failed_run(s3.client(), bucket, "runs/failed")
    s3.client().put_object(Bucket=bucket, Key="runs/failed/backup/state-3.json", Body=b"{}")
    uri = f"s3://{bucket}/runs/failed"
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "runs", "download", uri,
                                            str(tmp_path / "a"))
    assert rc == 2 and heavy == []
    assert "manifest.json does not exist: the run is unfinished" in err
    assert "--allow-unfinished" in err and not (tmp_path / "a").exists()

    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "runs", "download",
                                            "--allow-unfinished", uri, str(tmp_path / "b"))
    assert rc == 0, err
    assert "NOT checked" in out
    assert sorted(tree(tmp_path / "b")) == ["checkpoints/last.weights.h5", "config.json",
                                            "history.json", "status.json"]


def test_list_show_and_download_on_seaweedfs(seaweed, monkeypatch, tmp_path):
    """The same reads against a real object store: delimiter listings, GETs, HEADs."""
    point_boto3_at(seaweed, monkeypatch, tmp_path)
    bucket = make_bucket(seaweed)
    client = seaweed.client()
    made = time.time()
    blobs = runfolders.finished_run(client, bucket, "runs/done", now=made)
    runfolders.running_run(client, bucket, "runs/live", heartbeat_age=5, now=made)
    rows = json.loads(invoke("runs", "list", "--json", f"s3://{bucket}/runs/").stdout)
    assert [(r["name"], r["status"]) for r in rows] == [("done", "succeeded"),
                                                        ("live", "running")]
    assert "val_accuracy  ▁▃▄▆█" in invoke("runs", "show", f"s3://{bucket}/runs/done").stdout
    result = invoke("runs", "download", f"s3://{bucket}/runs/done", str(tmp_path / "out"))
    assert result.exit_code == 0 and tree(tmp_path / "out") == blobs


def test_a_resumed_run_counts_from_its_first_attempt():
    files = {"status.json": {"state": "succeeded", "first_started": NOW - 7200,
                             "started": NOW - 600, "finished": NOW, "epochs_done": 4},
             "manifest.json": True}
    row = runinfo.summarize("r", "s3://b/runs/r", files, now=NOW)
    assert row.started == NOW - 7200 and row.duration_seconds == pytest.approx(7200)
