"""trainjob.run.folder: the run folder's manifest, publish, status, the history plot."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from trainjob.run.folder import BACKUP, LOCK, MANIFEST, RunFolder, read_json, sha256, write_json
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store
from trainjob.train.plots import plot_history


@pytest.fixture
def s3store(s3env, bucket):
    return S3Store(bucket, "runs/exp1", threads=4)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --- RunFolder: manifest, publish ----------------------------------------------------------------

def populate(local: Path) -> dict[str, bytes]:
    """A finished run folder; returns the files that belong in the manifest."""
    published = {
        "config.json": b'{"optim": {}}',
        "classes.json": b'{"0": "accordion"}',
        "status.json": b'{"state": "succeeded"}',
        "training_log.csv": b"epoch,loss\n0,1.0\n1,0.5\n",
        "history.json": b"[]",
        "history.png": b"\x89PNG fake",
        "metrics.json": b'{"mean_per_class_accuracy": 0.5}',
        "checkpoints/best.weights.h5": os.urandom(5000),
        "checkpoints/last.weights.h5": os.urandom(5000),
        "model/model.keras": os.urandom(9000),
        "backup.json": b"not the backup folder",
    }
    for rel, data in published.items():
        write(local / rel, data)
    write(local / "backup" / "state.json", b'{"epoch": 2}')
    write(local / "backup" / "weights.weights.h5", b"resume")
    write(local / LOCK, b'{"token": "x"}')
    write(local / MANIFEST, b'{"stale": true}')
    write(local / ".config.json.tmp", b"half")
    write(local / "checkpoints" / ".hidden", b"h")
    return published


def test_manifest_lists_every_published_file_with_size_and_sha256(tmp_path):
    local = tmp_path / "run"
    published = populate(local)
    with RunFolder(local, LocalStore(local)) as run:
        manifest = run.manifest()
    assert set(manifest["files"]) == set(published)
    for rel, data in published.items():
        entry = manifest["files"][rel]
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert "created" in manifest
    json.dumps(manifest)


def test_publish_to_s3_uploads_manifest_last_and_drops_backup(s3store, s3, bucket, tmp_path):
    order: list[str] = []

    class Recording(S3Store):
        def put(self, src: Path, key: str) -> None:
            order.append(key)
            super().put(src, key)

    store = Recording(bucket, "runs/exp1", threads=4)
    # What an interrupted earlier attempt left in the bucket:
    store.write_bytes("backup/state.json", b'{"epoch": 1}')
    store.write_bytes("backup/weights.weights.h5", b"old")
    local = tmp_path / "run"
    published = populate(local)
    with RunFolder(local, store) as run:
        manifest = run.publish()
    assert order[-1] == MANIFEST
    assert order.count(MANIFEST) == 1
    assert set(order[:-1]) == set(published)
    keys = s3.keys(bucket, "runs/exp1/")
    assert set(keys) == {f"runs/exp1/{rel}" for rel in published} | {"runs/exp1/" + MANIFEST}
    assert not [k for k in keys if k.startswith("runs/exp1/backup/")]
    assert not (local / BACKUP).exists()
    remote = s3.read_json(bucket, "runs/exp1/" + MANIFEST)
    assert remote["files"] == manifest["files"]
    for rel, entry in remote["files"].items():
        body = s3.read(bucket, f"runs/exp1/{rel}")
        assert len(body) == entry["size"]
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]


def test_publish_to_another_local_folder(tmp_path):
    local, out = tmp_path / "run", tmp_path / "out"
    published = populate(local)
    write(out / "backup" / "state.json", b"{}")
    with RunFolder(local, LocalStore(out)) as run:
        run.publish()
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == set(published) | {MANIFEST}
    manifest = read_json(out / MANIFEST)
    for rel in published:
        assert manifest["files"][rel]["sha256"] == sha256(out / rel)


def test_publish_in_place_for_a_local_output(tmp_path):
    local = tmp_path / "run"
    published = populate(local)
    with RunFolder(local, LocalStore(local)) as run:
        manifest = run.publish()
    assert not run.uploader.enabled
    assert set(manifest["files"]) == set(published)
    assert read_json(local / MANIFEST)["files"] == manifest["files"]
    assert not (local / BACKUP).exists()


def test_status_and_json_writes(tmp_path):
    local = tmp_path / "run"
    with RunFolder(local, LocalStore(tmp_path / "out")) as run:
        run.set_status("running", epoch=0)
        run.set_status("failed", error="boom")
        run.uploader.flush(timeout=10)
    status = read_json(local / "status.json")
    assert status["state"] == "failed" and status["error"] == "boom" and status["epoch"] == 0
    assert read_json(tmp_path / "out" / "status.json") == status
    assert not list(local.glob(".*.tmp"))


def test_a_save_point_too_big_for_the_time_left_still_gets_the_stored_status_marked(
        s3env, bucket, through_proxy, tmp_path):
    """A stop whose last save point cannot go up in time (a link too slow for checkpoints):
    the status the store holds, which describes the newest save point wholly stored, is
    marked preempted, and the unsent generation's own status never lands."""
    proxy = through_proxy()
    with RunFolder(tmp_path / "run", S3Store(bucket, "runs/slow", threads=4)) as run:
        run.set_status("running", epochs_done=1)
        assert run.uploader.flush(timeout=30)
        proxy.stall_bodies_over = 2**20
        write(run.path("backup/state-000002.weights.h5"), os.urandom(2 * 2**20))
        run.set_status("running", epochs_done=2, upload=False)
        run.uploader.commit(["backup/state-000002.weights.h5", "status.json"], label="epoch 2")
        run.set_status("preempted", error="stopped by signal")
        assert not run.uploader.flush(timeout=1)
        started = time.monotonic()
        assert run.mark_stored_status("preempted", error="stopped by signal")
        assert time.monotonic() - started < 2
    stored = s3env.read_json(bucket, "runs/slow/status.json")
    assert stored["state"] == "preempted" and stored["error"] == "stopped by signal"
    assert stored["epochs_done"] == 1  # the stored save point's, not the unsent one's
    assert read_json(run.path("status.json"))["epochs_done"] == 2
    assert "runs/slow/backup/state-000002.weights.h5" not in s3env.keys(bucket, "runs/slow/")


def test_write_json_is_atomic_and_read_json_tolerates_garbage(tmp_path):
    write_json(tmp_path / "a" / "x.json", {"b": 1})
    assert read_json(tmp_path / "a" / "x.json") == {"b": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    (tmp_path / "bad.json").write_text("{nope")
    assert read_json(tmp_path / "bad.json", "default") == "default"
    assert read_json(tmp_path / "missing.json") is None


# --- plot -----------------------------------------------------------------------------------------

def test_plot_history_writes_a_png(tmp_path):
    from PIL import Image

    history = [{"epoch": e, "loss": 2.0 / (e + 1), "accuracy": 0.2 * e,
                "val_loss": 2.2 / (e + 1), "val_accuracy": 0.18 * e} for e in range(4)]
    history[1].pop("val_loss")  # validation_freq > 1 leaves gaps
    out = tmp_path / "history.png"
    plot_history(history, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.size[0] > 400 and img.size[1] > 200


@pytest.mark.parametrize("same", [True, False])
def test_the_last_checkpoint_equal_to_the_best_is_copied_in_the_store_not_uploaded(
        same, through_proxy, bucket, tmp_path):
    """Whenever the last epoch was the best, checkpoints/last.weights.h5 holds the bytes of
    best.weights.h5: they are uploaded once, and the store copies them (no second upload);
    different bytes are both uploaded. The manifest lists both either way."""
    proxy = through_proxy()
    local = tmp_path / "run"
    weights = os.urandom(2 << 20)
    (local / "checkpoints").mkdir(parents=True)
    (local / "checkpoints" / "best.weights.h5").write_bytes(weights)
    (local / "checkpoints" / "last.weights.h5").write_bytes(
        weights if same else os.urandom(2 << 20))
    (local / "status.json").write_text("{}")
    with RunFolder(local, S3Store(bucket, "runs/copy", threads=2)) as run:
        run.publish(timeout=30)
        sent = run.uploader.bytes_sent
    last = [s for s in proxy.seen if s.method == "PUT" and
            s.path.endswith("/runs/copy/checkpoints/last.weights.h5")]
    assert len(last) == 1
    assert ("x-amz-copy-source" in last[0].headers) == same, last[0].headers
    # The checkpoints' bytes, once or twice; status.json and the manifest.
    assert sent == (1 if same else 2) * (2 << 20) + 2 + (local / MANIFEST).stat().st_size
    both = read_json(local / MANIFEST)["files"]
    stored = S3Store(bucket, "runs/copy", threads=2)
    for rel in ("checkpoints/best.weights.h5", "checkpoints/last.weights.h5"):
        assert hashlib.sha256(stored.read_bytes(rel)).hexdigest() == both[rel]["sha256"]
    assert (both["checkpoints/best.weights.h5"]["sha256"] ==
            both["checkpoints/last.weights.h5"]["sha256"]) == same
