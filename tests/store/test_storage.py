"""trainjob.store.s3 against a real S3 server (moto_server over HTTP) and the local disk."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_bucket, point_boto3_at
from helpers.faultproxy import FaultProxy

import trainjob
from trainjob.errors import ConfigError, DataError, StorageError
from trainjob.store import transfer
from trainjob.store.base import ObjectInfo
from trainjob.store.client import _clients, redact, s3_client
from trainjob.store.fetch import fetch
from trainjob.store.local import LocalStore
from trainjob.store.mirror import FetchResult
from trainjob.store.s3 import S3Store
from trainjob.store.uri import open_store, parse_uri


def assert_one_line(err: StorageError | DataError | ConfigError, *needles: str) -> str:
    message = str(err)
    assert "\n" not in message and message.strip() == message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --- parse_uri ----------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expected", [
    ("s3://datasets/caltech-101.zip", ("s3", "datasets", "caltech-101.zip")),
    ("s3://datasets/a/b/", ("s3", "datasets", "a/b/")),
    ("s3://datasets", ("s3", "datasets", "")),
    ("s3a://datasets/x.tgz", ("s3", "datasets", "x.tgz")),
    ("/data/caltech-101.zip", ("file", "", "/data/caltech-101.zip")),
    ("relative/folder", ("file", "", "relative/folder")),
    ("file:///data/x.tar", ("file", "", "/data/x.tar")),
    ("/data/with#hash?.zip", ("file", "", "/data/with#hash?.zip")),
])
def test_parse_uri(uri, expected):
    assert parse_uri(uri) == expected


@pytest.mark.parametrize("uri", ["gs://bucket/x.zip", "http://host/x.zip", "ftp://h/x",
                                 "s3:///x.zip"])
def test_parse_uri_rejects_unknown_schemes(uri):
    with pytest.raises(ConfigError) as err:
        parse_uri(uri)
    assert err.value.exit_code == 2
    assert_one_line(err.value, uri)


def test_redact_drops_user_and_password():
    assert "secret" not in redact("http://user:secret@minio:9000")
    assert "user" not in redact("http://user:secret@minio:9000")
    assert redact("http://minio:9000") == "http://minio:9000"


def test_redact_keeps_host_and_port():
    assert redact("http://user:secret@minio:9000/") == "http://minio:9000/"


@pytest.mark.parametrize("url, expected", [
    # AWS SigV4 presigned: credential, session token and signature; the rest as written
    (("https://b.s3.amazonaws.com/k.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
      "&X-Amz-Credential=AKID%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T0"
      "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=T0K"
      "&X-Amz-Signature=5f"),
     ("https://b.s3.amazonaws.com/k.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
      "&X-Amz-Credential=REDACTED&X-Amz-Date=20260101T0&X-Amz-Expires=3600"
      "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED")),
    # SigV2 presigned, lower case
    ("https://h/k?AWSAccessKeyId=AKID&Expires=9&signature=S1&x-amz-security-token=T",
     ("https://h/k?AWSAccessKeyId=REDACTED&Expires=9&signature=REDACTED"
      "&x-amz-security-token=REDACTED")),
    # Azure SAS
    ("https://a.blob.core.windows.net/c/f.zip?sv=2022-11-02&se=2026-01-01&sp=r&SIG=ab%2Bc%3D",
     "https://a.blob.core.windows.net/c/f.zip?sv=2022-11-02&se=2026-01-01&sp=r&SIG=REDACTED"),
    # GCS V4 signed
    (("https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256"
      "&X-Goog-Credential=x&X-Goog-Signature=ff"),
     ("https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256"
      "&X-Goog-Credential=REDACTED&X-Goog-Signature=REDACTED")),
    # user:password, an OAuth token, an API key; a parameter merely ending in "key" is kept
    ("http://u:p@h:9/a?access_token=t&key=k&monkey=3",
     "http://h:9/a?access_token=REDACTED&key=REDACTED&monkey=3"),
    ("https://h/a.zip?version=2", "https://h/a.zip?version=2"),
])
def test_redact_removes_the_secrets_of_signed_urls(url, expected):
    assert redact(url) == expected


# --- the client ----------------------------------------------------------------------------

def test_client_settings_for_s3_compatible_servers(s3env):
    client = s3_client(threads=24)
    cfg = client.meta.config
    assert client.meta.endpoint_url == s3env.endpoint
    assert cfg.s3["addressing_style"] == "path"
    assert cfg.retries["mode"] == "standard"
    assert cfg.max_pool_connections >= 24
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert s3_client(threads=24) is client  # one client per pool size


def test_endpoint_url_s3_takes_precedence(s3env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3env.endpoint)
    _clients.clear()
    assert s3_client(4).meta.endpoint_url == s3env.endpoint


# --- S3Store ---------------------------------------------------------------------------------

def test_s3store_round_trip(s3env, bucket, tmp_path):
    store = S3Store(bucket, "runs/exp1", threads=4)
    assert store.uri == f"s3://{bucket}/runs/exp1"
    assert store.list() == []
    assert store.read_bytes("missing.json") is None
    assert store.read_info("missing.json") is None
    assert not store.exists("missing.json")

    store.write_bytes("a.json", b'{"a": 1}')
    src = tmp_path / "weights.h5"
    src.write_bytes(os.urandom(3000))
    store.put(src, "checkpoints/best.weights.h5")
    store.write_json("status.json", {"state": "running"})
    # a sibling prefix that merely starts with the same letters is not ours
    s3env.client().put_object(Bucket=bucket, Key="runs/exp10/other.json", Body=b"x")

    assert set(s3env.keys(bucket, "runs/")) == {
        "runs/exp1/a.json", "runs/exp1/checkpoints/best.weights.h5",
        "runs/exp1/status.json", "runs/exp10/other.json"}
    listed = {o.key: o for o in store.list()}
    assert set(listed) == {"a.json", "checkpoints/best.weights.h5", "status.json"}
    assert listed["checkpoints/best.weights.h5"].size == 3000
    assert listed["a.json"].etag == hashlib.md5(b'{"a": 1}').hexdigest()
    assert [o.key for o in store.list("checkpoints/")] == ["checkpoints/best.weights.h5"]

    info = store.read_info("a.json")
    assert info == ObjectInfo("a.json", 8, hashlib.md5(b'{"a": 1}').hexdigest())
    assert store.exists("a.json")
    assert store.read_bytes("a.json") == b'{"a": 1}'
    assert store.read_json("status.json") == {"state": "running"}

    dest = tmp_path / "down" / "best.weights.h5"
    store.get("checkpoints/best.weights.h5", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert not list(dest.parent.glob(".*part"))  # no temporary left behind

    store.delete(["a.json", "status.json"])
    assert [o.key for o in store.list()] == ["checkpoints/best.weights.h5"]
    store.delete(["does-not-exist.json"])  # deleting nothing is fine


def test_s3store_without_prefix(s3env, bucket):
    store = S3Store(bucket, "")
    store.write_bytes("top.txt", b"1")
    store.write_bytes("dir/inner.txt", b"22")
    assert {o.key: o.size for o in store.list()} == {"top.txt": 1, "dir/inner.txt": 2}
    assert store.child("dir/inner.txt") == f"s3://{bucket}/dir/inner.txt"


def test_s3store_get_missing_key_is_storage_error(s3env, bucket, tmp_path):
    with pytest.raises(StorageError) as err:
        S3Store(bucket, "p").get("nope.bin", tmp_path / "nope.bin")
    assert err.value.exit_code == 4
    assert_one_line(err.value, "nope.bin")
    assert not (tmp_path / "nope.bin").exists()


def test_s3store_delete_many(s3env, bucket):
    store = S3Store(bucket, "many")
    for i in range(25):
        store.write_bytes(f"k{i:02d}", b"x")
    store.delete([f"k{i:02d}" for i in range(25)])
    assert s3env.keys(bucket, "many/") == {}


@pytest.mark.parametrize("refusal", ["MissingContentMD5", "InvalidRequest"])
def test_delete_where_batch_deletes_need_content_md5(s3env, bucket, through_proxy, refusal):
    """Older MinIO and Ceph refuse DeleteObjects without Content-MD5, which boto3 >= 1.36 no
    longer sends: the keys must still go, one request each."""
    for i in range(5):
        s3env.client().put_object(Bucket=bucket, Key=f"runs/r/k{i}", Body=b"x")
    s3env.client().put_object(Bucket=bucket, Key="runs/other", Body=b"keep")
    proxy = through_proxy(delete_objects="require-md5", refusal=refusal)
    store = S3Store(bucket, "runs/r", threads=4)
    store.delete([f"k{i}" for i in range(5)] + ["never-there"])
    assert s3env.keys(bucket, "runs/") == {"runs/other": 4}
    assert sum(1 for method, _ in proxy.requests if method == "DELETE") == 6
    store.write_bytes("k9", b"y")  # a second delete on the same store works the same way
    store.delete(["k9"])
    assert s3env.keys(bucket, "runs/r/") == {}


def test_delete_reports_keys_the_server_refused(s3env, bucket, through_proxy):
    """A 200 DeleteObjects answer can still list per-key errors: never report success then."""
    for name in ("a.json", "b.json"):
        s3env.client().put_object(Bucket=bucket, Key=f"runs/r/{name}", Body=b"x")
    through_proxy(delete_objects="key-errors")
    with pytest.raises(StorageError) as err:
        S3Store(bucket, "runs/r").delete(["a.json", "b.json"])
    assert err.value.exit_code == 4
    message = assert_one_line(err.value, f"s3://{bucket}/runs/r/a.json", "AccessDenied", "2")
    assert "delete" in message
    assert set(s3env.keys(bucket, "runs/r/")) == {"runs/r/a.json", "runs/r/b.json"}


# --- fetch ----------------------------------------------------------------------------------

def test_fetch_archive_then_cache_then_changed_object(s3env, bucket, tmp_path, official_zip):
    s3env.client().upload_file(str(official_zip), bucket, "datasets/caltech-101.zip")
    cache = tmp_path / "cache"
    uri = f"s3://{bucket}/datasets/caltech-101.zip"

    first = fetch(uri, cache, threads=4)
    assert isinstance(first, FetchResult)
    assert first.path.is_file() and first.path.name == "caltech-101.zip"
    assert first.path.read_bytes() == official_zip.read_bytes()
    assert (first.downloaded_objects, first.downloaded_bytes, first.cached_objects) == \
        (1, official_zip.stat().st_size, 0)

    again = fetch(uri, cache, threads=4)
    assert (again.downloaded_objects, again.downloaded_bytes, again.cached_objects) == (0, 0, 1)
    assert again.path == first.path

    # Same size, new content: a new ETag must be downloaded again, never served stale.
    data = bytearray(official_zip.read_bytes())
    data[-1] ^= 0xFF
    s3env.client().put_object(Bucket=bucket, Key="datasets/caltech-101.zip", Body=bytes(data))
    changed = fetch(uri, cache, threads=4)
    assert (changed.downloaded_objects, changed.cached_objects) == (1, 0)
    assert changed.path.read_bytes() == bytes(data)


def upload_folder(s3, bucket: str, root: Path, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root.parent).as_posix()
            client.upload_file(str(path), bucket, prefix + rel)
            files[rel] = path.read_bytes()
    return files


def test_fetch_prefix_in_parallel_then_cached(s3env, bucket, tmp_path, class_folders,
                                              monkeypatch):
    files = upload_folder(s3env, bucket, class_folders, "caltech/")
    assert len(files) > 20
    active, peak, lock = [0], [0], threading.Lock()
    real_download = transfer.ObjectReader.download

    def counting_download(self, key, size, etag, dest):  # the real one, concurrency measured
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.02)
            return real_download(self, key, size, etag, dest)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(transfer.ObjectReader, "download", counting_download)
    cache = tmp_path / "cache"
    uri = f"s3://{bucket}/caltech/"
    first = fetch(uri, cache, threads=4)
    assert first.path.is_dir()
    assert first.downloaded_objects == len(files) and first.cached_objects == 0
    assert first.downloaded_bytes == sum(len(b) for b in files.values())
    assert peak[0] > 1, "prefix download did not run in parallel"
    assert peak[0] <= 4
    got = {p.relative_to(first.path).as_posix(): p.read_bytes()
           for p in first.path.rglob("*") if p.is_file()}
    assert got == files

    second = fetch(f"s3://{bucket}/caltech", cache, threads=4)  # no trailing slash: same data
    assert (second.downloaded_objects, second.cached_objects) == (0, len(files))

    one = "101_ObjectCategories/accordion/image_0001.jpg"
    s3env.client().put_object(Bucket=bucket, Key="caltech/" + one, Body=b"new content")
    third = fetch(uri, cache, threads=4)
    assert (third.downloaded_objects, third.cached_objects) == (1, len(files) - 1)
    assert (third.path / one).read_bytes() == b"new content"


def test_fetch_prefix_drops_objects_deleted_from_the_bucket(s3env, bucket, tmp_path):
    client = s3env.client()
    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg"):
        client.put_object(Bucket=bucket, Key=f"data/{name}", Body=name.encode())
    cache = tmp_path / "cache"
    fetch(f"s3://{bucket}/data/", cache, threads=2)
    client.delete_object(Bucket=bucket, Key="data/a/2.jpg")
    result = fetch(f"s3://{bucket}/data/", cache, threads=2)
    local = sorted(p.relative_to(result.path).as_posix()
                   for p in result.path.rglob("*") if p.is_file())
    assert local == ["a/1.jpg", "b/1.jpg"]


def test_fetch_single_object_without_archive_suffix(s3env, bucket, tmp_path):
    s3env.client().put_object(Bucket=bucket, Key="models/resnet.weights.h5", Body=b"w" * 100)
    result = fetch(f"s3://{bucket}/models/resnet.weights.h5", tmp_path / "c", 2, single=True)
    assert result.path.read_bytes() == b"w" * 100 and result.downloaded_objects == 1


# --- fetch failures: one line, exit 4 -------------------------------------------------------

def test_missing_bucket(s3env, tmp_path):
    with pytest.raises(StorageError) as err:
        fetch("s3://no-such-bucket-here/caltech-101.zip", tmp_path / "c", 2)
    assert err.value.exit_code == 4
    assert_one_line(err.value, "no-such-bucket-here", "does not exist")
    with pytest.raises(StorageError) as err:
        S3Store("no-such-bucket-here", "runs").list()
    assert_one_line(err.value, "no-such-bucket-here", "does not exist")


def test_missing_archive_key(s3env, bucket, tmp_path):
    with pytest.raises(StorageError) as err:
        fetch(f"s3://{bucket}/nope/caltech-101.zip", tmp_path / "c", 2)
    assert err.value.exit_code == 4
    assert_one_line(err.value, f"s3://{bucket}/nope/caltech-101.zip", "does not exist")


def test_wrong_secret_key(s3env, bucket, tmp_path, monkeypatch):
    s3env.client().put_object(Bucket=bucket, Key="d/x.zip", Body=b"PK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    _clients.clear()
    for action in (lambda: fetch(f"s3://{bucket}/d/x.zip", tmp_path / "c", 2),
                   lambda: S3Store(bucket, "d").list(),
                   lambda: S3Store(bucket, "d").write_bytes("k", b"x")):
        with pytest.raises(StorageError) as err:
            action()
        assert err.value.exit_code == 4
        message = assert_one_line(err.value, bucket, "AWS_SECRET_ACCESS_KEY")
        assert "definitely-not-the-secret" not in message
        assert s3env.secret_key not in message


def test_unreachable_endpoint(s3env, tmp_path, monkeypatch):
    from s3server import free_port  # conftest puts scripts/ on sys.path

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _clients.clear()
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        fetch("s3://datasets/caltech-101.zip", tmp_path / "c", 2)
    assert err.value.exit_code == 4
    assert_one_line(err.value, endpoint, "AWS_ENDPOINT_URL")
    with pytest.raises(StorageError) as err:
        S3Store("datasets", "").read_bytes("x.json")
    assert_one_line(err.value, endpoint)
    assert time.monotonic() - started < 20


def test_empty_prefix(s3env, bucket, tmp_path):
    s3env.client().put_object(Bucket=bucket, Key="other/file.jpg", Body=b"x")
    with pytest.raises(DataError) as err:  # nothing to train on: not retriable
        fetch(f"s3://{bucket}/empty/", tmp_path / "c", 2)
    assert err.value.exit_code == 3
    assert_one_line(err.value, f"s3://{bucket}/empty/")


# --- LocalStore ----------------------------------------------------------------------------

def test_localstore_round_trip(tmp_path):
    store = LocalStore(tmp_path / "out")
    assert store.list() == []
    assert store.read_bytes("missing.json") is None and store.read_info("missing.json") is None
    assert not store.exists("missing.json")
    store.write_bytes("a.json", b'{"a": 1}')
    src = tmp_path / "w.h5"
    src.write_bytes(b"w" * 500)
    store.put(src, "checkpoints/best.weights.h5")
    store.write_json("status.json", {"state": "running"})
    status_size = (tmp_path / "out" / "status.json").stat().st_size
    assert {o.key: o.size for o in store.list()} == {
        "a.json": 8, "checkpoints/best.weights.h5": 500, "status.json": status_size}
    assert [o.key for o in store.list("checkpoints/")] == ["checkpoints/best.weights.h5"]
    assert store.read_info("a.json").size == 8 and store.exists("a.json")
    assert store.read_json("status.json") == {"state": "running"}
    assert not list((tmp_path / "out").rglob("*.tmp"))
    dest = tmp_path / "copy" / "best.h5"
    store.get("checkpoints/best.weights.h5", dest)
    assert dest.read_bytes() == b"w" * 500
    store.delete(["a.json", "never-there.json"])
    assert not (tmp_path / "out" / "a.json").exists()
    store.put(tmp_path / "out" / "status.json", "status.json")  # onto itself: a no-op
    assert store.read_json("status.json") == {"state": "running"}


def test_localstore_changed_file_gets_new_etag(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("x", b"1")
    before = store.read_info("x")
    os.utime(tmp_path / "x", ns=(1, 1))
    assert store.read_info("x").etag != before.etag


def test_localstore_errors_are_storage_errors(tmp_path):
    store = LocalStore(tmp_path / "out")
    with pytest.raises(StorageError) as err:
        store.get("missing.bin", tmp_path / "dest.bin")
    assert err.value.exit_code == 4
    assert_one_line(err.value, "missing.bin")
    (tmp_path / "blocker").write_text("a file, not a folder")
    blocked = LocalStore(tmp_path / "blocker")
    with pytest.raises(StorageError):
        blocked.write_bytes("x.json", b"{}")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    with pytest.raises(StorageError):
        blocked.put(src, "sub/x.bin")


def test_fetch_local_path_is_used_in_place(tmp_path, official_zip):
    result = fetch(str(official_zip), tmp_path / "cache")
    assert result.path == official_zip.absolute()
    assert result.downloaded_objects == 0
    assert not (tmp_path / "cache").exists()


def test_fetch_missing_local_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        fetch(str(tmp_path / "nope.zip"), tmp_path / "cache")
    assert_one_line(err.value, "nope.zip")


def test_open_store_picks_the_backend(s3env, tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3store = open_store("s3://some-bucket/runs/x", threads=3)
    assert isinstance(s3store, S3Store)
    assert (s3store.bucket, s3store.prefix) == ("some-bucket", "runs/x")


def test_put_failures_are_storage_errors(s3env, bucket, tmp_path, monkeypatch):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 10)
    with pytest.raises(StorageError) as err:
        S3Store("no-such-bucket-for-put", "runs").put(src, "f.bin")
    assert_one_line(err.value, "no-such-bucket-for-put", "does not exist")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    _clients.clear()
    with pytest.raises(StorageError) as err:
        S3Store(bucket, "runs").put(src, "f.bin")
    assert_one_line(err.value, bucket, "AWS_SECRET_ACCESS_KEY")


# --- the download cache at scale, interrupted, refused, over HTTP ----------------------------

@pytest.fixture
def on_server(server, monkeypatch, tmp_path):
    """trainjob's client pointed at each real server in turn (moto, SeaweedFS)."""
    point_boto3_at(server, monkeypatch, tmp_path, AWS_MAX_ATTEMPTS="2")
    yield server
    _clients.clear()


def put_many(server, bucket: str, objects: dict[str, bytes]) -> None:
    client = server.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]),
                      objects.items()))


def mirror_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file()}


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    calls, real = [0], getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_fetch_keeps_a_mirror_of_thousands_of_objects_exact(seaweed, tmp_path, monkeypatch):
    """On SeaweedFS, the server of the benchmark (moto takes minutes for thousands)."""
    point_boto3_at(seaweed, monkeypatch, tmp_path, AWS_MAX_ATTEMPTS="2")
    on_server, bucket = seaweed, make_bucket(seaweed)
    objects = {f"data/c{i % 25:02d}/img_{i:05d}.jpg": b"object %d;" % i * (1 + i % 9)
               for i in range(2500)}
    objects["data/lonely/only.jpg"] = b"alone in its folder"
    put_many(on_server, bucket, objects)
    full_calls = count_calls(monkeypatch, transfer.ObjectReader, "_get")
    uri, cache = f"s3://{bucket}/data/", tmp_path / "cache"
    expected = {k[len("data/"):]: v for k, v in objects.items()}

    first = fetch(uri, cache, threads=8)
    assert (first.downloaded_objects, first.cached_objects) == (len(objects), 0)
    assert mirror_of(first.path) == expected
    assert full_calls[0] == 0, "objects left the direct GET path"

    # Change three (one keeps its size: only the ETag tells), delete four (one empties its
    # folder), add two.
    client = on_server.client()
    edits = {"data/c00/img_00000.jpg": b"OBJECT 0;", "data/c01/img_00001.jpg": b"longer now",
             "data/c02/img_00002.jpg": b"x", "data/c03/new_1.jpg": b"new 1",
             "data/zz/new_2.jpg": b"new 2"}
    assert len(edits["data/c00/img_00000.jpg"]) == len(objects["data/c00/img_00000.jpg"])
    put_many(on_server, bucket, edits)
    deleted = ["data/c04/img_00004.jpg", "data/c05/img_00005.jpg", "data/c06/img_00006.jpg",
               "data/lonely/only.jpg"]
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in deleted]})
    expected.update({k[len("data/"):]: v for k, v in edits.items()})
    for key in deleted:
        del expected[key[len("data/"):]]

    second = fetch(uri, cache, threads=8)
    assert (second.downloaded_objects, second.cached_objects) == (5, len(objects) - 3 - 4)
    assert mirror_of(second.path) == expected
    assert not (second.path / "lonely").exists()

    third = fetch(uri, cache, threads=8)
    assert (third.downloaded_objects, third.cached_objects) == (0, len(expected))

    # A copy changed on disk, same size, is not trusted either.
    victim = third.path / "c07" / "img_00007.jpg"
    victim.write_bytes(b"?" * victim.stat().st_size)
    fourth = fetch(uri, cache, threads=8)
    assert (fourth.downloaded_objects, fourth.cached_objects) == (1, len(expected) - 1)
    assert victim.read_bytes() == expected["c07/img_00007.jpg"]


KILLED_FETCH = """
import os, signal, sys, threading
from pathlib import Path
from trainjob.store import fetch, mirror, transfer

mirror.FLUSH_ROWS = 5  # journal every few objects, so some of them outlive the kill
real, lock, seen = transfer._FastGet.get, threading.Lock(), [0]

def get(self, key, tmp):
    with lock:
        seen[0] += 1
        last = seen[0] == int(sys.argv[3])
    if last:
        tmp.write_bytes(b"the first half of an obj")  # a download cut short...
        os.kill(os.getpid(), signal.SIGKILL)  # ...by the end of the process
    return real(self, key, tmp)

transfer._FastGet.get = get
fetch.fetch(sys.argv[1], Path(sys.argv[2]), 3)
"""


def test_a_killed_fetch_leaves_nothing_that_passes_for_complete(s3env, bucket, tmp_path):
    objects = {f"data/c{i % 4}/img_{i:04d}.jpg": b"content of %d " % i * 40 for i in range(300)}
    put_many(s3env, bucket, objects)
    uri, cache = f"s3://{bucket}/data/", tmp_path / "cache"
    env = s3env.env(PYTHONPATH=str(Path(trainjob.__file__).parents[1]))
    killed = subprocess.run([sys.executable, "-c", KILLED_FETCH, uri, str(cache), "120"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    root = cache / "s3" / bucket / "data"
    left = mirror_of(root)
    partial = [k for k in left if k.endswith(".part")]
    assert partial, "the cut download left no temporary file"
    complete = {k: v for k, v in left.items() if not k.endswith(".part")}
    assert 0 < len(complete) < len(objects)
    for key, data in complete.items():  # whatever has its final name is whole
        assert data == objects["data/" + key], key

    # One object the killed run already had changes meanwhile: it must not be served stale.
    changed = sorted(complete)[0]
    s3env.client().put_object(Bucket=bucket, Key="data/" + changed, Body=b"changed since")
    again = fetch(uri, cache, threads=3)
    expected = {k[len("data/"):]: v for k, v in objects.items()}
    expected[changed] = b"changed since"
    assert mirror_of(again.path) == expected  # temporaries swept, the rest downloaded
    assert again.downloaded_objects + again.cached_objects == len(objects)
    assert again.cached_objects > 0, "nothing the killed run finished was trusted"
    assert again.downloaded_objects >= len(objects) - len(complete)


def test_fetch_refuses_keys_that_escape_the_cache_folder(s3env, bucket, tmp_path):
    s3env.client().put_object(Bucket=bucket, Key="data/ok.jpg", Body=b"fine")
    s3env.client().put_object(Bucket=bucket, Key="data/../../../outside.txt", Body=b"evil")
    listed = [o.key for o in S3Store(bucket, "").list("data/")]
    assert "data/../../../outside.txt" in listed  # the server keeps the key as it is
    with pytest.raises(StorageError) as err:
        fetch(f"s3://{bucket}/data/", tmp_path / "c" / "cache", threads=2)
    assert err.value.exit_code == 4
    assert_one_line(err.value, "outside.txt", "escapes the cache folder")
    assert not list(tmp_path.rglob("outside.txt"))


def test_fetch_through_cut_and_throttled_responses_is_exact(s3env, bucket, tmp_path,
                                                           monkeypatch):
    objects = {f"data/{i:03d}.jpg": bytes([i % 251]) * (2000 + i) for i in range(120)}
    put_many(s3env, bucket, objects)
    full_calls = count_calls(monkeypatch, transfer.ObjectReader, "_get")
    with FaultProxy(s3env.endpoint, drop=0.15, slowdown=0.1, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
        _clients.clear()
        result = fetch(f"s3://{bucket}/data/", tmp_path / "cache", threads=4)
        faults = proxy.injected["drop"] + proxy.injected["slowdown"]
        assert proxy.injected["drop"] > 0 and proxy.injected["slowdown"] > 0
    assert mirror_of(result.path) == {k[len("data/"):]: v for k, v in objects.items()}
    assert not list(result.path.rglob("*.part"))
    # A cut or throttled direct GET costs that object one full call, not the fast path.
    assert 0 < full_calls[0] <= faults < len(objects) // 2


def test_large_objects_come_in_ranged_parts_pinned_to_one_version(on_server, bucket, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(transfer, "PART", 64 * 1024)
    monkeypatch.setattr(transfer, "LARGE", 128 * 1024)
    data = os.urandom(1024 * 1024 + 123)
    on_server.client().put_object(Bucket=bucket, Key="d/big.tar", Body=data)
    ranges = count_calls(monkeypatch, transfer._FastGet, "get_range")
    uri, cache = f"s3://{bucket}/d/big.tar", tmp_path / "cache"
    result = fetch(uri, cache, threads=4)
    assert result.path.read_bytes() == data
    assert ranges[0] == 17  # 1 MiB + 123 bytes in 64 KiB parts

    # The object changes between the listing and the download: no part of the new version
    # may be mixed into the old, and nothing half-done may stay.
    newer = os.urandom(len(data))
    real = transfer.ObjectReader.download

    def replaced_first(self, key, size, etag, dest):
        on_server.client().put_object(Bucket=bucket, Key="d/big.tar", Body=newer)
        return real(self, key, size, etag, dest)

    on_server.client().put_object(Bucket=bucket, Key="d/big.tar", Body=data[::-1])
    monkeypatch.setattr(transfer.ObjectReader, "download", replaced_first)
    with pytest.raises(StorageError) as err:
        fetch(uri, cache, threads=4)
    assert_one_line(err.value, "d/big.tar", "changed while it was being downloaded")
    assert result.path.read_bytes() == data  # the old copy stays until a whole new one
    assert not list(result.path.parent.glob("*.part"))
    monkeypatch.setattr(transfer.ObjectReader, "download", real)
    assert fetch(uri, cache, threads=4).path.read_bytes() == newer


def test_a_listing_out_of_key_order_is_sorted_instead(s3env, bucket, tmp_path, monkeypatch,
                                                      caplog):
    objects = {f"data/{name}.jpg": name.encode() for name in ("b", "a", "d", "c")}
    put_many(s3env, bucket, objects)
    real = S3Store.iter_list
    monkeypatch.setattr(S3Store, "iter_list",
                        lambda self, prefix="": iter(sorted(real(self, prefix),
                                                            key=lambda o: o.key[-5] == "c")))
    first = fetch(f"s3://{bucket}/data/", tmp_path / "cache", threads=2)
    assert "out of order" in caplog.text
    assert mirror_of(first.path) == {k[len("data/"):]: v for k, v in objects.items()}
    assert (first.downloaded_objects, first.cached_objects) == (4, 0)
    again = fetch(f"s3://{bucket}/data/", tmp_path / "cache", threads=2)
    assert (again.downloaded_objects, again.cached_objects) == (0, 4)


def test_direct_gets_stop_after_a_few_refusals(s3env, bucket, tmp_path, monkeypatch, caplog):
    """A server that refuses the direct GETs themselves (say, a signature it does not
    accept) gets the full client call for every object, after three tries."""
    objects = {f"data/{i:02d}.jpg": b"%d" % i for i in range(20)}
    put_many(s3env, bucket, objects)
    tries = [0]

    def refused(self, key, headers):
        tries[0] += 1
        return "HTTP 403"

    monkeypatch.setattr(transfer._FastGet, "_request", refused)
    caplog.set_level(logging.INFO, logger="trainjob.store.transfer")
    result = fetch(f"s3://{bucket}/data/", tmp_path / "cache", threads=1)
    assert mirror_of(result.path) == {k[len("data/"):]: v for k, v in objects.items()}
    assert tries[0] == transfer.MAX_MISSES
    assert "refused (HTTP 403)" in caplog.text


HOLDING_JOB = """
import sys
from pathlib import Path
from trainjob.store import fetch, hostcache
with hostcache.session():  # as a job: the prefix's mirror stays held (shared) for the run
    fetch.fetch(sys.argv[1], Path(sys.argv[2]), 2)
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_an_unchanged_prefix_held_by_another_job_is_served_at_once(s3env, bucket, tmp_path):
    """Only a prefix that changed needs the exclusive lock (and so waits for the jobs using
    it); an unchanged one is checked under the shared lock and served from the cache."""
    put_many(s3env, bucket, {f"data/{i}.jpg": b"%d" % i for i in range(5)})
    uri, cache_dir = f"s3://{bucket}/data/", tmp_path / "cache"
    env = s3env.env(PYTHONPATH=str(Path(trainjob.__file__).parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", HOLDING_JOB, uri, str(cache_dir)],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        got: list[FetchResult] = []
        fetcher = threading.Thread(target=lambda: got.append(fetch(uri, cache_dir, 2)))
        fetcher.start()
        fetcher.join(30)
        assert got, "an unchanged prefix waited for the job holding it"
        assert (got[0].downloaded_objects, got[0].cached_objects) == (0, 5)
    finally:
        holder.stdin.close()
        holder.wait(30)
