"""Run folders made by hand in a bucket: finished, failed, running, stale (no training)."""

from __future__ import annotations

import hashlib
import json
import time

CLASSES = ["accordion", "airplanes", "anchor", "ant", "barrel", "bass", "beaver"]


def put_json(client, bucket: str, key: str, obj: object) -> bytes:
    data = json.dumps(obj, indent=2).encode()
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return data


def history(epochs: int) -> list[dict]:
    return [{"epoch": e, "loss": 2.0 - 0.3 * e, "accuracy": 0.2 + 0.1 * e,
             "val_loss": 2.1 - 0.25 * e, "val_accuracy": 0.1 + 0.12 * e, "lr": 3e-4}
            for e in range(epochs)]


def csv_log(rows: list[dict]) -> bytes:
    lines = ["epoch,accuracy,loss,lr,val_accuracy,val_loss"]
    lines += [f"{r['epoch']},{r['accuracy']},{r['loss']},{r['lr']},{r['val_accuracy']},"
              f"{r['val_loss']}" for r in rows]
    return ("\n".join(lines) + "\n").encode()


def config(epochs: int) -> dict:
    return {"settings": {"data": {"data": "s3://datasets/caltech-101.zip"},
                         "optim": {"epochs": epochs, "batch_size": 32, "optimizer": "adam",
                                   "learning_rate": 3e-4},
                         "model": {"image_size": 224, "weights": "imagenet"},
                         "split": {"seed": 42}},
            "dataset": {"classes": len(CLASSES), "images": 700, "skipped": 2},
            "versions": {"trainjob": "0.1.0"}}


def finished_run(client, bucket: str, prefix: str, *, now: float | None = None) -> dict:
    """A succeeded, published run; returns {key relative to the run: bytes} of its files."""
    now = time.time() if now is None else now
    rows = history(5)
    per_class = {name: round(0.9 - 0.1 * i, 2) for i, name in enumerate(CLASSES)}
    files = {
        "status.json": {"state": "succeeded", "started": now - 3600, "finished": now - 60,
                        "epochs_done": 5, "epoch": 4, "error": None,
                        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60))},
        "config.json": config(5),
        "history.json": rows,
        "classes.json": {str(i): n for i, n in enumerate(CLASSES)},
        "metrics.json": {"test_images": 70, "loss": 1.1, "accuracy": 0.7, "top5_accuracy": 0.95,
                         "per_class_accuracy": per_class,
                         "mean_per_class_accuracy": sum(per_class.values()) / len(per_class)},
    }
    blobs = {k: json.dumps(v, indent=2).encode() for k, v in files.items()}
    blobs["training_log.csv"] = csv_log(rows)
    blobs["history.png"] = b"\x89PNG fake plot"
    blobs["checkpoints/best.weights.h5"] = b"best weights " * 1000
    blobs["checkpoints/last.weights.h5"] = b"last weights " * 1000
    blobs["model/model.keras"] = b"model " * 5000
    for rel, data in blobs.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    manifest = {"files": {rel: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                          for rel, d in blobs.items()}, "created": "2026-11-27T00:00:00Z"}
    put_json(client, bucket, f"{prefix}/manifest.json", manifest)
    return blobs


def failed_run(client, bucket: str, prefix: str, *, now: float | None = None) -> None:
    now = time.time() if now is None else now
    put_json(client, bucket, f"{prefix}/status.json", {
        "state": "failed", "started": now - 600, "epochs_done": 2, "epoch": 1,
        "error": "the loss became NaN at epoch 2",
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 300))})
    put_json(client, bucket, f"{prefix}/config.json", config(10))
    put_json(client, bucket, f"{prefix}/history.json", history(2))
    client.put_object(Bucket=bucket, Key=f"{prefix}/checkpoints/last.weights.h5", Body=b"w")


def running_run(client, bucket: str, prefix: str, *, heartbeat_age: float,
                now: float | None = None) -> None:
    """status.json says running; run.lock.json's heartbeat is ``heartbeat_age`` seconds old."""
    now = time.time() if now is None else now
    started = now - heartbeat_age - 900  # 15 minutes of training before the last beat
    put_json(client, bucket, f"{prefix}/status.json", {
        "state": "running", "started": started, "epochs_done": 3, "epoch": 2,
        "phase": None, "metrics": history(3)[-1],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - heartbeat_age))})
    put_json(client, bucket, f"{prefix}/config.json", config(20))
    put_json(client, bucket, f"{prefix}/history.json", history(3))
    put_json(client, bucket, f"{prefix}/run.lock.json", {
        "token": "t" * 32, "host": "node-7", "pid": 4242, "owner": "",
        "started": started, "heartbeat": now - heartbeat_age})
