"""End to end, through the real CLI in a subprocess, against real S3 servers over HTTP: the
core runs once on moto and once on SeaweedFS (the ``server`` fixture)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import sampledata
from conftest import SMALL, Result, run_trainjob, upload_tree

pytestmark = pytest.mark.e2e

ARTIFACTS = ["config.json", "classes.json", "status.json", "training_log.csv", "history.json",
             "history.png", "checkpoints/best.weights.h5", "checkpoints/last.weights.h5",
             "model/model.keras", "metrics.json", "manifest.json"]


def assert_complete_run(s3, bucket: str, prefix: str, epochs: int) -> dict:
    """Everything DESIGN.md lists is in the bucket and consistent; returns the manifest."""
    keys = s3.keys(bucket, prefix + "/")
    names = {k[len(prefix) + 1:] for k in keys}
    missing = [a for a in ARTIFACTS if a not in names]
    assert not missing, f"missing artifacts: {missing} (have {sorted(names)})"
    assert not any(n.startswith("backup/") for n in names), "resume state left behind"
    assert "run.lock.json" not in names

    rows = list(csv.DictReader(io.StringIO(s3.read(bucket, f"{prefix}/training_log.csv").decode())))
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    history = s3.read_json(bucket, f"{prefix}/history.json")
    assert [h["epoch"] for h in history] == list(range(epochs))
    for row, h in zip(rows, history):
        assert float(row["loss"]) == pytest.approx(h["loss"], rel=1e-6)
        assert float(row["val_accuracy"]) == pytest.approx(h["val_accuracy"], rel=1e-6)

    manifest = s3.read_json(bucket, f"{prefix}/manifest.json")
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = s3.read(bucket, f"{prefix}/{name}")
        assert len(data) == entry["size"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name

    classes = s3.read_json(bucket, f"{prefix}/classes.json")
    assert "BACKGROUND_Google" not in classes.values()
    metrics = s3.read_json(bucket, f"{prefix}/metrics.json")
    assert 0.0 <= metrics["mean_per_class_accuracy"] <= 1.0
    assert set(metrics["per_class_accuracy"]) <= set(classes.values())
    assert s3.read_json(bucket, f"{prefix}/status.json")["state"] == "succeeded"
    return manifest


def assert_stock_client_pulls_the_run(s3, bucket: str, prefix: str, dest: Path) -> None:
    """`aws s3 sync` (awscli, nothing of ours) pulls the run folder, and every file matches
    manifest.json: same names, none extra or missing, same sizes and sha256."""
    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    assert aws, "awscli is part of the test extra"
    proc = subprocess.run([aws, "s3", "sync", f"s3://{bucket}/{prefix}", str(dest),
                           "--endpoint-url", s3.endpoint, "--no-progress", "--only-show-errors"],
                          env=s3.env(AWS_CONFIG_FILE="/dev/null"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((dest / "manifest.json").read_text())
    pulled = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert pulled == set(manifest["files"]) | {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (dest / name).read_bytes()
        assert len(data) == entry["size"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name


def test_official_zip_end_to_end_then_cached_rerun(server, bucket, official_zip, tmp_path):
    s3 = server
    s3.client().upload_file(str(official_zip), bucket, "datasets/caltech-101.zip")
    cache = tmp_path / "cache"
    args = ["train", "--data", f"s3://{bucket}/datasets/caltech-101.zip",
            "--output", f"s3://{bucket}/runs/exp1", "--epochs", "2",
            "--cache-dir", str(cache), *SMALL]
    result = run_trainjob(args, s3.env(), tmp_path / "home")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_complete_run(s3, bucket, "runs/exp1", epochs=2)
    assert_stock_client_pulls_the_run(s3, bucket, "runs/exp1", tmp_path / "pulled")

    config = s3.read_json(bucket, "runs/exp1/config.json")
    dataset = config["dataset"]
    assert dataset["download"]["objects_downloaded"] == 1
    skipped = {Path(s["path"]).name for s in dataset["skipped_files"]}
    assert skipped == {"truncated_0001.jpg", "empty_0001.jpg", "notes.txt"}
    assert dataset["converted_to_rgb"] >= 1  # the CMYK JPEG
    assert "BACKGROUND_Google" not in dataset["class_counts"]
    assert set(config["timings_seconds"]) >= {"download", "extract", "scan", "train", "evaluate"}
    # Credentials never reach the run folder or the logs.
    for text in (json.dumps(config), result.stdout, result.stderr):
        assert s3.secret_key not in text

    # The final model loads with plain Keras and takes raw 0-255 RGB images.
    import keras

    model_path = tmp_path / "model.keras"
    s3.client().download_file(bucket, "runs/exp1/model/model.keras", str(model_path))
    import trainjob.model  # noqa: F401 - registers the preprocessing layer

    model = keras.saving.load_model(model_path)
    probs = model.predict(np.full((2, 32, 32, 3), 200.0, np.float32), verbose=0)
    assert probs.shape == (2, len(dataset["class_counts"]))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)

    if s3.kind != "moto":
        return  # the cached rerun does the same on every server: checked once, on moto
    # Same cache, new output: nothing is downloaded again. It starts from the first run's
    # best checkpoint, fetched through storage (--weights URI).
    args2 = [a if a != f"s3://{bucket}/runs/exp1" else f"s3://{bucket}/runs/exp2" for a in args]
    args2[args2.index("--epochs") + 1] = "1"
    args2 += ["--weights", f"s3://{bucket}/runs/exp1/checkpoints/best.weights.h5"]
    again = run_trainjob(args2, s3.env(), tmp_path / "home")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    dl = s3.read_json(bucket, "runs/exp2/config.json")["dataset"]["download"]
    assert dl["objects_downloaded"] == 0 and dl["objects_cached"] == 1
    assert s3.read_json(bucket, "runs/exp2/config.json")["settings"]["model"]["weights"].endswith(
        "best.weights.h5")


def test_prefix_of_class_folders_end_to_end(s3, bucket, class_folders, tmp_path):
    upload_tree(s3, bucket, class_folders, "caltech/101_ObjectCategories/")
    result = run_trainjob(["train", "--data", f"s3://{bucket}/caltech/",
                           "--output", f"s3://{bucket}/runs/prefix", "--epochs", "2", *SMALL],
                          s3.env(), tmp_path / "home")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_complete_run(s3, bucket, "runs/prefix", epochs=2)
    config = s3.read_json(bucket, "runs/prefix/config.json")
    assert config["dataset"]["download"]["objects_downloaded"] > 40


def test_learns_three_solid_colours_with_local_paths(tmp_path):
    data = tmp_path / "colours"
    sampledata.make_solid_classes(data, per_class=40)
    out = tmp_path / "run"
    # 30 steps per epoch: ResNet50's BatchNorm moving statistics (momentum 0.99) need a few
    # hundred steps before inference-mode predictions reflect what training learned.
    result = run_trainjob(["train", "--data", str(data), "--output", str(out), "--epochs", "10",
                           "--image-size", "32", "--batch-size", "16", "--steps-per-epoch", "30",
                           "--threads", "2"], {**_plain_env()}, tmp_path / "home")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9, metrics
    assert (out / "manifest.json").exists()


def _plain_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINJOB_"))}


# --- bad input: the right exit code, one line on stderr, no traceback, no manifest ----------

def _tar_with(tmp_path: Path, name: str, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        img = io.BytesIO()
        sampledata.image_for(0, 0).save(img, "JPEG")
        for cls in ("a", "b"):
            info = tarfile.TarInfo(f"data/{cls}/x.jpg")
            info.size = len(img.getvalue())
            tar.addfile(info, io.BytesIO(img.getvalue()))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


def _slip_archive(tmp_path: Path) -> Path:
    return _tar_with(tmp_path, "slip.tar.gz", tarfile.TarInfo("../../evil.txt"), b"pwned")


def _link_archive(tmp_path: Path) -> Path:
    link = tarfile.TarInfo("data/a/passwd.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    return _tar_with(tmp_path, "link.tar.gz", link)


def _corrupt_folder(tmp_path: Path) -> Path:
    root = tmp_path / "corrupt"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


WRONG_SECRET = "definitely-wrong-secret-8d1f"
# Failures of the storage itself: each runs on every server (see test_storage_failure...).
STORAGE_FAILURES = {
    "missing bucket": (lambda s3, b, t: ["--data", str(_corrupt_folder(t)),
                                         "--output", "s3://no-such-bucket-here/run"], 4, {}),
    "wrong secret key": (lambda s3, b, t: ["--data", f"s3://{b}/x.zip",
                                           "--output", f"s3://{b}/run"], 4,
                         {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}),
}
BAD_INPUTS = {
    "unreachable endpoint": (lambda s3, b, t: ["--data", f"s3://{b}/x.zip",
                                               "--output", f"s3://{b}/run"], 4,
                             {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "2"}),
    "unknown URI scheme": (lambda s3, b, t: ["--data", "gs://bucket/data.zip",
                                             "--output", f"s3://{b}/run"], 2, {}),
    "empty prefix": (lambda s3, b, t: ["--data", f"s3://{b}/nothing/here/",
                                       "--output", f"s3://{b}/run"], 3, {}),
    "tar-slip archive": (lambda s3, b, t: ["--data", str(_slip_archive(t)),
                                           "--output", f"s3://{b}/run"], 3, {}),
    "link out of archive": (lambda s3, b, t: ["--data", str(_link_archive(t)),
                                              "--output", f"s3://{b}/run"], 3, {}),
    "every image corrupt": (lambda s3, b, t: ["--data", str(_corrupt_folder(t)),
                                              "--output", f"s3://{b}/run"], 3, {}),
    "val fraction 1.5": (lambda s3, b, t: ["--data", "x.zip", "--output", f"s3://{b}/run",
                                           "--val-fraction", "1.5"], 2, {}),
    "unknown option": (lambda s3, b, t: ["--data", "x.zip", "--output", f"s3://{b}/run",
                                         "--no-such-option", "3"], 2, {}),
}


def _assert_fails_cleanly(s3, bucket: str, tmp_path: Path, case: tuple) -> Result:
    make_args, code, env = case
    result = run_trainjob(["train", *make_args(s3, bucket, tmp_path), "--epochs", "1"],
                          s3.env(**env), tmp_path / "home", timeout=180)
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = result.error_lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trainjob: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(k.endswith("manifest.json") for k in s3.keys(bucket))
    assert not (tmp_path.parent / "evil.txt").exists()
    return result


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, s3, bucket, tmp_path):
    _assert_fails_cleanly(s3, bucket, tmp_path, BAD_INPUTS[case])


@pytest.mark.parametrize("case", list(STORAGE_FAILURES))
def test_storage_failure_fails_cleanly(case, server, bucket, tmp_path):
    """Exit 4 in seconds (no retries on a refusal), one line, no secret in any output."""
    started = time.monotonic()
    result = _assert_fails_cleanly(server, bucket, tmp_path, STORAGE_FAILURES[case])
    assert time.monotonic() - started < 30
    line = result.error_lines()[0]
    output = result.stdout + result.stderr
    assert WRONG_SECRET not in output and server.secret_key not in output
    if case == "wrong secret key":
        assert "invalid S3 credentials" in line and "AWS_SECRET_ACCESS_KEY" in line, line
    else:
        assert "no-such-bucket-here" in line and "does not exist" in line, line
