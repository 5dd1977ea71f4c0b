"""Compare-and-swap through the Store interface (trainjob.store.conditional): a local folder, moto
and SeaweedFS, each over its real transport."""

from __future__ import annotations

import threading

import pytest

from trainjob.errors import StorageError
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store


def test_put_if_absent_creates_only_once(store):
    etag = store.put_if_absent("k.json", b"one")
    assert etag
    assert store.put_if_absent("k.json", b"two") is None
    data, seen = store.read_versioned("k.json")
    assert data == b"one" and seen == etag  # GET reports the ETag the PUT returned


def test_put_if_match_replaces_only_the_version_seen(store):
    first = store.put_if_absent("k.json", b"one")
    second = store.put_if_match("k.json", b"two", first)
    assert second and second != first
    assert store.put_if_match("k.json", b"three", first) is None  # stale ETag
    assert store.read_versioned("k.json") == (b"two", second)
    assert store.put_if_match("missing.json", b"x", second) is None
    assert store.read_versioned("missing.json") is None


def test_delete_if_match_deletes_only_the_version_seen(store):
    first = store.put_if_absent("k.json", b"one")
    second = store.put_if_match("k.json", b"two", first)
    assert store.delete_if_match("k.json", first) is False
    assert store.read_versioned("k.json") == (b"two", second)
    assert store.delete_if_match("k.json", second) is True
    assert store.read_versioned("k.json") is None
    assert store.delete_if_match("k.json", second) is False


def test_concurrent_creates_have_one_winner(store):
    barrier = threading.Barrier(6)
    results: list[str | None] = []

    def create(i: int) -> None:
        barrier.wait()
        results.append(store.put_if_absent("race.json", f"writer {i}".encode()))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r is not None]
    assert len(results) == 6 and len(winners) == 1, results
    data, etag = store.read_versioned("race.json")
    assert etag == winners[0] and data.startswith(b"writer ")


def test_local_objects_are_written_whole_and_leave_no_temp_files(tmp_path):
    store = LocalStore(tmp_path / "run")
    etag = store.put_if_absent("a/lock.json", b"x" * 100_000)
    store.put_if_match("a/lock.json", b"y" * 50_000, etag)
    assert [p.name for p in (tmp_path / "run" / "a").iterdir()] == ["lock.json"]
    assert (tmp_path / "run" / "a" / "lock.json").read_bytes() == b"y" * 50_000


def test_local_failures_are_one_line_storage_errors(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    store = LocalStore(tmp_path / "file")
    with pytest.raises(StorageError) as err:
        store.put_if_absent("lock.json", b"x")
    assert "\n" not in str(err.value) and str(tmp_path / "file") in str(err.value)


def test_s3_failures_are_one_line_storage_errors(s3env):
    store = S3Store("no-such-bucket-for-cas", "run", threads=2)
    for call in (lambda: store.put_if_absent("lock.json", b"x"),
                 lambda: store.put_if_match("lock.json", b"x", '"abc"'),
                 lambda: store.read_versioned("lock.json")):
        with pytest.raises(StorageError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "s3://no-such-bucket-for-cas/run/lock.json" in message
        assert s3env.secret_key not in message
