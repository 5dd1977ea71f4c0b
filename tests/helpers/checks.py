"""Checks every complete run folder passes: the artifacts, the manifest sha256 by sha256,
the logs, the stock client's pull, TensorBoard's steps."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from trainjob.train import eventlog

ARTIFACTS = ["config.json", "classes.json", "status.json", "training_log.csv", "history.json",
             "history.png", "checkpoints/best.weights.h5", "checkpoints/last.weights.h5",
             "model/model.keras", "metrics.json", "confusion.png", "per_class.png",
             "manifest.json"]


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
    matrix = metrics["confusion_matrix"]  # rows: true classes, in classes.json order
    assert len(matrix) == len(classes) and sum(map(sum, matrix)) == metrics["test_images"]
    assert all(c["count"] == matrix[int(_index(classes, c["true"]))][
        int(_index(classes, c["predicted"]))] for c in metrics["top_confusions"])
    assert s3.read_json(bucket, f"{prefix}/status.json")["state"] == "succeeded"
    return manifest


def _index(classes: dict[str, str], name: str) -> str:
    return next(i for i, n in classes.items() if n == name)


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


def assert_each_step_once(run: Path, epochs: int) -> dict[str, list[tuple[int, float]]]:
    """Both files of ``run`` (a run folder) hold steps 0..epochs-1, each once per tag."""
    train = read_scalars(run / eventlog.TRAIN)
    val = read_scalars(run / eventlog.VALIDATION)
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(train), train
    assert {"epoch_loss", "epoch_accuracy"} <= set(val), val
    for tag, points in [*train.items(), *val.items()]:
        steps = [s for s, _ in points]
        assert sorted(steps) == list(range(epochs)), (tag, steps)
        assert max(Counter(steps).values()) == 1, (tag, steps)
    return train


def read_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in an event file, as {tag: [(step, value), ...]} in file order."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for record in tf.data.TFRecordDataset(str(path)):
        event = event_pb2.Event.FromString(record.numpy())
        for value in event.summary.value:
            number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                else value.simple_value
            out.setdefault(value.tag, []).append((event.step, number))
    return out
