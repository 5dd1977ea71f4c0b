"""trainjob.run.uploader: generations, order, skipping, retries without giving up, fencing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from trainjob.errors import StorageError
from trainjob.run.folder import upload_rank
from trainjob.run.uploader import Uploader
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store


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
    """Fails puts (all, or of one key) while ``failures`` lasts; records every attempt."""

    def __init__(self, root: Path, failures: int, key: str | None = None) -> None:
        super().__init__(root)
        self.failures, self.key = failures, key
        self.attempts: list[tuple[float, str]] = []
        self.stored: list[str] = []

    def put(self, src: Path, key: str) -> None:
        self.attempts.append((time.monotonic(), key))
        if (self.key in (None, key)) and self.failures > 0:
            self.failures -= 1
            raise StorageError(f"simulated outage writing {key}")
        super().put(src, key)
        self.stored.append(key)


@pytest.fixture
def uploaders():
    made: list[Uploader] = []

    def make(store, root: Path, **kwargs) -> Uploader:
        root.mkdir(parents=True, exist_ok=True)
        up = Uploader(store, root, order=upload_rank, **kwargs)
        made.append(up)
        return up

    yield make
    for up in made:
        if isinstance(up.store, RecordingStore):
            up.store.gate.set()
        up.close()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def epoch_files(run: Path, epoch: int, weights: bytes = b"") -> list[str]:
    """What a save point writes: a new resume pair, the pointer, logs, status."""
    pair = [f"backup/state-{epoch:06d}.weights.h5", f"backup/state-{epoch:06d}.json"]
    write(run / pair[0], weights or f"weights {epoch}".encode())
    write(run / pair[1], f'{{"epoch": {epoch}}}')
    write(run / "backup/state.json", f'{{"epoch": {epoch}}}')
    write(run / "training_log.csv", "epoch\n" + "".join(f"{e}\n" for e in range(epoch)))
    write(run / "status.json", f'{{"epochs_done": {epoch}}}')
    return pair


def commit_epoch(up: Uploader, run: Path, epoch: int, after=(), **kw) -> None:
    pair = epoch_files(run, epoch, **kw)
    up.commit([*pair, "backup/state.json", "training_log.csv", "status.json"],
              label=f"epoch {epoch}", transient=pair, after=after)


# --- single files -------------------------------------------------------------------------

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
    up.submit("last.weights.h5")  # changed after its snapshot: not "up to date"
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


def test_disabled_uploader_does_nothing(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    up = uploaders(store, tmp_path / "run", enabled=False)
    write(tmp_path / "run" / "a.json", b"{}")
    up.submit("a.json")
    assert up.flush(timeout=5) and store.puts == []


def test_uploader_to_real_s3(s3env, s3, bucket, tmp_path, uploaders):
    up = uploaders(S3Store(bucket, "runs/exp1", threads=4), tmp_path / "run")
    write(tmp_path / "run" / "checkpoints" / "last.weights.h5", os.urandom(2048))
    up.submit("checkpoints/last.weights.h5")
    assert up.flush(timeout=20)
    assert s3.read(bucket, "runs/exp1/checkpoints/last.weights.h5") == \
        (tmp_path / "run" / "checkpoints" / "last.weights.h5").read_bytes()


# --- generations ----------------------------------------------------------------------------

def test_a_generation_goes_up_in_dependency_order(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    up = uploaders(store, tmp_path / "run")
    run = tmp_path / "run"
    pair = epoch_files(run, 1)
    write(run / "checkpoints/best.weights.h5", b"best")
    # Listed in the worst order on purpose: the uploader orders them.
    up.commit(["status.json", "backup/state.json", "training_log.csv", pair[1],
               "checkpoints/best.weights.h5", pair[0]], transient=pair)
    assert up.flush(timeout=10)
    # The weights, the log that describes them, the record and the pointer that make them
    # the resume point, the best checkpoint (never ahead of it), the status.
    assert [k for k, _ in store.puts] == [
        pair[0], "training_log.csv", pair[1], "backup/state.json",
        "checkpoints/best.weights.h5", "status.json"]


def test_epochs_faster_than_uploads_skip_to_the_newest_generation(tmp_path, uploaders, caplog):
    """The livelock of old: status.json, always queued last, was overtaken every epoch and
    never sent. Now the generation in flight finishes, then the newest one goes whole."""
    store = RecordingStore(tmp_path / "out")
    store.gate.clear()
    up = uploaders(store, tmp_path / "run")
    run = tmp_path / "run"
    done: list[int] = []
    commit_epoch(up, run, 1, after=[lambda: done.append(1)])
    assert store.entered.wait(5)  # epoch 1's weights are on their way
    for epoch in range(2, 7):
        if epoch == 3:
            write(run / "checkpoints/best.weights.h5", b"best of epoch 3")
            up.commit(["checkpoints/best.weights.h5"], label="best")
        commit_epoch(up, run, epoch, after=[lambda e=epoch: done.append(e)])
    store.gate.set()
    with caplog.at_level("INFO", logger="trainjob.run.uploader"):
        assert up.flush(timeout=10)
    keys = [k for k, _ in store.puts]
    first = keys[:5]
    assert first == ["backup/state-000001.weights.h5", "training_log.csv",
                     "backup/state-000001.json", "backup/state.json", "status.json"]
    assert keys[5:] == ["backup/state-000006.weights.h5", "training_log.csv",
                        "backup/state-000006.json", "backup/state.json",
                        "checkpoints/best.weights.h5", "status.json"]
    assert dict(store.puts)["status.json"] == b'{"epochs_done": 6}'
    assert dict(store.puts)["checkpoints/best.weights.h5"] == b"best of epoch 3"
    assert done == [1, 6]  # the skipped generations' actions never ran
    assert up.skipped == 5  # epochs 2-5 and the "best" generation
    assert "skipped 5 generation(s)" in caplog.text
    assert not list(up.staging.iterdir()), "snapshots of skipped generations were left behind"


def test_commit_never_waits_for_the_network(tmp_path, uploaders):
    store = RecordingStore(tmp_path / "out")
    store.gate.clear()
    up = uploaders(store, tmp_path / "run")
    run = tmp_path / "run"
    commit_epoch(up, run, 1)
    assert store.entered.wait(5)
    started = time.monotonic()
    for epoch in range(2, 40):
        commit_epoch(up, run, epoch, weights=os.urandom(256 * 1024))
    assert time.monotonic() - started < 5
    # At most one generation waits: its snapshots, and those of the one in flight.
    names = [p.name for p in up.staging.iterdir()]
    assert len([n for n in names if n.endswith(".weights.h5")]) <= 2, names
    store.gate.set()
    assert up.flush(timeout=10)


def test_a_failed_upload_is_resent_before_anything_after_it(tmp_path, uploaders):
    """No skipping ahead: the state that names the weights never lands without them."""
    store = FailingStore(tmp_path / "out", failures=3, key="backup/state-000001.weights.h5")
    up = uploaders(store, tmp_path / "run", backoff=0.02)
    commit_epoch(up, tmp_path / "run", 1)
    assert up.flush(timeout=10)
    assert store.stored == ["backup/state-000001.weights.h5", "training_log.csv",
                            "backup/state-000001.json", "backup/state.json", "status.json"]
    assert [k for _, k in store.attempts[:4]] == ["backup/state-000001.weights.h5"] * 4
    gaps = [b[0] - a[0] for a, b in zip(store.attempts, store.attempts[1:3])]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04  # exponential backoff
    assert up.error is None  # a success clears the failure: no sticky error


def test_an_outage_fails_flush_only_while_it_lasts(tmp_path, uploaders):
    store = FailingStore(tmp_path / "out", failures=10**9)
    up = uploaders(store, tmp_path / "run", backoff=0.02)
    run = tmp_path / "run"
    write(run / "a.json", b"{}")
    up.submit("a.json")
    with pytest.raises(StorageError) as err:
        up.flush(timeout=0.5)
    assert err.value.exit_code == 4 and "a.json" in str(err.value)
    assert len(store.attempts) >= 3  # it kept trying
    store.failures = 0  # the store is back
    write(run / "status.json", b'{"state": "failed"}')
    up.submit("status.json")
    assert up.flush(timeout=10)  # no leftover error from the outage
    assert (tmp_path / "out" / "status.json").read_bytes() == b'{"state": "failed"}'
    assert (tmp_path / "out" / "a.json").exists()


def test_upload_to_a_missing_bucket_fails_flush(s3env, tmp_path, uploaders):
    broken = S3Store("no-such-bucket-for-uploads", "runs/x", threads=2)
    up = uploaders(broken, tmp_path / "run", backoff=0.01)
    write(tmp_path / "run" / "a.json", b"{}")
    up.submit("a.json")
    with pytest.raises(StorageError) as err:
        up.flush(timeout=3)
    assert "no-such-bucket-for-uploads" in str(err.value)


def test_a_fenced_uploader_sends_nothing_more(tmp_path, uploaders):
    class Lost(Exception):
        pass

    store = RecordingStore(tmp_path / "out")
    lost = threading.Event()

    def fence() -> None:
        if lost.is_set():
            raise Lost("another job owns the run")

    up = uploaders(store, tmp_path / "run", fence=fence)
    run = tmp_path / "run"
    commit_epoch(up, run, 1)
    assert up.flush(timeout=10)
    sent = len(store.puts)
    lost.set()  # another job owns the run now
    commit_epoch(up, run, 2)
    with pytest.raises(Lost):
        up.flush(timeout=10)
    assert len(store.puts) == sent
