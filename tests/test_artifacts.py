"""trainjob.artifacts: the Uploader, the run folder's manifest, publish, the history plot."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from trainjob.artifacts import (
    BACKUP,
    LOCK,
    MANIFEST,
    RunFolder,
    Uploader,
    plot_history,
    read_json,
    sha256,
    write_json,
)
from trainjob.errors import StorageError
from trainjob.storage import LocalStore, S3Store


class RecordingStore(LocalStore):
    """A local store that records each put (key, content) and can hold puts at a gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[tuple[str, bytes]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def put(self, src: Path, key: str) -> None:
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        self.puts.append((key, src.read_bytes()))
        super().put(src, key)


class FailingStore(LocalStore):
    """Fails the first ``failures`` puts; records when each attempt happened."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures
        self.attempts: list[float] = []

    def put(self, src: Path, key: str) -> None:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            raise StorageError(f"simulated outage writing {key}")
        super().put(src, key)


@pytest.fixture
def uploaders():
    made: list[Uploader] = []

    def make(store, root: Path, **kwargs) -> Uploader:
        root.mkdir(parents=True, exist_ok=True)
        up = Uploader(store, root, **kwargs)
        made.append(up)
        return up

    yield make
    for up in made:
        if isinstance(up.store, RecordingStore):
            up.store.gate.set()
        up.close()


@pytest.fixture
def s3store(s3env, bucket):
    return S3Store(bucket, "runs/exp1", threads=4)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --- Uploader ---------------------------------------------------------------------------------

def test_uploads_a_file(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    up = uploaders(store, tmp_path / "run")
    write(tmp_path / "run" / "checkpoints" / "best.weights.h5", b"w1")
    up.submit("checkpoints/best.weights.h5", "not-there.json")
    assert up.flush(timeout=10)
    assert store.puts == [("checkpoints/best.weights.h5", b"w1")]
    assert (tmp_path / "out" / "checkpoints" / "best.weights.h5").read_bytes() == b"w1"


def test_newer_version_replaces_a_queued_older_one(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    store.gate.clear()
    up = uploaders(store, tmp_path / "run")
    run = tmp_path / "run"
    write(run / "blocker.bin", b"first")
    up.submit("blocker.bin")
    assert store.entered.wait(5)  # the uploader is now busy with blocker.bin
    write(run / "history.json", b"v1")
    up.submit("history.json")
    write(run / "history.json", b"v2-longer")
    up.submit("history.json")
    snapshots = [p.read_bytes() for p in up.staging.iterdir() if p.name.endswith("history.json")]
    assert snapshots == [b"v2-longer"], "the older snapshot was not dropped"
    store.gate.set()
    assert up.flush(timeout=10)
    assert [k for k, _ in store.puts] == ["blocker.bin", "history.json"]
    assert store.puts[1] == ("history.json", b"v2-longer")
    assert up.uploads == 2


def test_files_are_snapshotted_at_submit(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    store.gate.clear()
    up = uploaders(store, tmp_path / "run")
    run = tmp_path / "run"
    write(run / "blocker.bin", b"x")
    up.submit("blocker.bin")
    assert store.entered.wait(5)
    write(run / "last.weights.h5", b"epoch-1")
    up.submit("last.weights.h5")
    write(run / "last.weights.h5", b"half-written epoch 2")  # Keras rewrites it meanwhile
    store.gate.set()
    assert up.flush(timeout=10)
    assert ("last.weights.h5", b"epoch-1") in store.puts
    # ...and because the file changed after its snapshot, it is not "up to date":
    up.submit("last.weights.h5")
    assert up.flush(timeout=10)
    assert store.puts[-1] == ("last.weights.h5", b"half-written epoch 2")


def test_unchanged_files_are_not_uploaded_again(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    up = uploaders(store, tmp_path / "run")
    f = write(tmp_path / "run" / "status.json", b"{}")
    up.submit("status.json")
    up.flush(timeout=10)
    up.submit("status.json")
    up.flush(timeout=10)
    assert len(store.puts) == 1 and up.uploads == 1
    st = f.stat()
    write(f, b"{1}")  # same size would do too: the mtime changed
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    up.submit("status.json")
    up.flush(timeout=10)
    assert len(store.puts) == 2 and store.puts[-1] == ("status.json", b"{1}")
    up.submit("status.json", force=True)
    up.flush(timeout=10)
    assert len(store.puts) == 3


def test_retries_with_backoff_then_succeeds(tmp_path, uploaders):
    store = FailingStore(tmp_path / "out", failures=2)
    up = uploaders(store, tmp_path / "run", retries=3, backoff=0.05)
    write(tmp_path / "run" / "a.json", b"{}")
    up.submit("a.json")
    assert up.flush(timeout=10)
    assert len(store.attempts) == 3
    gaps = [b - a for a, b in zip(store.attempts, store.attempts[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential backoff
    assert (tmp_path / "out" / "a.json").read_bytes() == b"{}"


def test_retries_exhausted_raise_storage_error_from_flush(tmp_path, uploaders):
    store = FailingStore(tmp_path / "out", failures=100)
    up = uploaders(store, tmp_path / "run", retries=2, backoff=0.02)
    write(tmp_path / "run" / "a.json", b"{}")
    up.submit("a.json")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        up.flush(timeout=10)
    assert time.monotonic() - started < 5
    assert err.value.exit_code == 4 and "a.json" in str(err.value)
    assert len(store.attempts) == 3  # first try + 2 retries
    gaps = [b - a for a, b in zip(store.attempts, store.attempts[1:])]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04
    with pytest.raises(StorageError):  # the failure stays visible
        up.flush(timeout=1)


def test_upload_to_a_missing_bucket_fails_flush(s3store, tmp_path, uploaders):
    broken = S3Store("no-such-bucket-for-uploads", "runs/x", threads=2)
    up = uploaders(broken, tmp_path / "run", retries=1, backoff=0.01)
    write(tmp_path / "run" / "a.json", b"{}")
    up.submit("a.json")
    with pytest.raises(StorageError) as err:
        up.flush(timeout=20)
    assert "no-such-bucket-for-uploads" in str(err.value)


def test_pending_bytes_cap_makes_submit_wait(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    store.gate.clear()
    up = uploaders(store, tmp_path / "run", max_pending_bytes=100)
    run = tmp_path / "run"
    write(run / "a.bin", b"a" * 150)
    write(run / "b.bin", b"b" * 150)
    write(run / "c.bin", b"c" * 150)
    up.submit("a.bin")
    assert store.entered.wait(5)  # a is being uploaded: nothing pending
    up.submit("b.bin")  # pending 0 < 100: queued at once
    done = threading.Event()
    threading.Thread(target=lambda: (up.submit("c.bin"), done.set()), daemon=True).start()
    assert not done.wait(0.3), "submit did not wait although the queue was over its cap"
    store.gate.set()
    assert done.wait(5)
    assert up.flush(timeout=10)
    assert [k for k, _ in store.puts] == ["a.bin", "b.bin", "c.bin"]


def test_disabled_uploader_does_nothing(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    up = uploaders(store, tmp_path / "run", enabled=False)
    write(tmp_path / "run" / "a.json", b"{}")
    up.submit("a.json")
    assert up.flush(timeout=5) and store.puts == []


def test_uploader_to_real_s3(s3store, s3, bucket, tmp_path, uploaders):
    up = uploaders(s3store, tmp_path / "run")
    write(tmp_path / "run" / "checkpoints" / "last.weights.h5", os.urandom(2048))
    up.submit("checkpoints/last.weights.h5")
    assert up.flush(timeout=20)
    assert s3.read(bucket, "runs/exp1/checkpoints/last.weights.h5") == \
        (tmp_path / "run" / "checkpoints" / "last.weights.h5").read_bytes()


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
