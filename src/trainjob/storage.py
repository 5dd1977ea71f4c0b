"""``s3://`` and local URIs behind one small interface: list, get, put, delete, with retries;
and ``fetch``, the cached, parallel download of a dataset (the cache itself: ``download``).

All S3 traffic goes through ``s3client``: one boto3 client built from boto3's own credential
chain (env keys, profiles, IRSA, instance roles), pointed at MinIO, Ceph or any
S3-compatible server by ``AWS_ENDPOINT_URL``. Every botocore failure leaves this module as a
one-line ``StorageError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import botocore.exceptions
from boto3.s3.transfer import TransferConfig, create_transfer_manager

from trainjob import conditional, download
from trainjob.download import FetchResult, check_inside  # noqa: F401 - re-exported
from trainjob.errors import ConfigError, StorageError
from trainjob.s3client import endpoint_name, s3_client, translated

log = logging.getLogger(__name__)

MiB = 1024**2
# Attempts of each request of an upload with a deadline (the run folder's): one request
# then lasts at most 4 x (10 s to connect + 60 s to read) plus backoff, under 300 s, half
# the run lock's stale time: a write begun inside the lease lands before another job may
# take the lock over, or not at all. The uploader itself retries, checking the lease first.
UPLOAD_ATTEMPTS = 4
Deadline = Callable[[], float]  # when a write must be done by, on time.monotonic's clock
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# DeleteObjects errors meaning "this server takes no batch deletes like that": one key a time.
BATCH_DELETE_REFUSED = {"MissingContentMD5", "InvalidRequest", "InvalidDigest", "NotImplemented"}


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int
    etag: str


def parse_uri(uri: str) -> tuple[str, str, str]:
    """Split a URI into (scheme, bucket, key); local paths have scheme 'file' and no bucket."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return "file", "", parts.path if parts.scheme else uri
    if parts.scheme in ("s3", "s3a"):
        if not parts.netloc:
            raise ConfigError(f"{uri!r} names no bucket: use s3://bucket/key")
        return "s3", parts.netloc, parts.path.lstrip("/")
    raise ConfigError(f"unsupported URI scheme {parts.scheme + '://'!r} in {uri!r}: "
                      "use s3://bucket/key or a local path")


class Store:
    """A folder-like location: a local directory or an S3 bucket + prefix."""

    uri: str

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def get(self, key: str, dest: Path) -> None: ...
    def put(self, src: Path, key: str, until: Deadline | None = None) -> None: ...
    def read_bytes(self, key: str) -> bytes | None: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def delete(self, keys: list[str]) -> None: ...

    def folders(self, prefix: str = "") -> list[str]:
        """The names of the folders directly under ``prefix`` (one level, sorted)."""

    def exists(self, key: str) -> bool:
        return self.read_info(key) is not None

    def read_info(self, key: str) -> ObjectInfo | None: ...

    # Compare-and-swap (see conditional.py): the new ETag, or None/False when another
    # writer got there first (412). ``read_versioned`` gives the ETag to compare against.
    def read_versioned(self, key: str) -> tuple[bytes, str] | None: ...
    def put_if_absent(self, key: str, data: bytes) -> str | None: ...
    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None: ...
    def delete_if_match(self, key: str, etag: str) -> bool: ...

    def child(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def read_json(self, key: str) -> dict | None:
        data = self.read_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            log.warning("ignoring unreadable %s", self.child(key))
            return None

    def write_json(self, key: str, obj: object) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if not base.exists():
            return []
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        return [ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size,
                           str(p.stat().st_mtime_ns)) for p in files]

    def folders(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def read_info(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        if not p.is_file():
            return None
        st = p.stat()
        return ObjectInfo(key, st.st_size, str(st.st_mtime_ns))

    def get(self, key: str, dest: Path) -> None:
        with _local_errors(self.child(key)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(key), dest)

    def put(self, src: Path, key: str, until: Deadline | None = None) -> None:
        target = self._path(key)
        if target.resolve() == src.resolve():
            return
        _before(until, self.child(key))  # a local copy takes no time worth cancelling
        with _local_errors(self.child(key)):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)  # readers never see half a file

    def read_bytes(self, key: str) -> bytes | None:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None

    def write_bytes(self, key: str, data: bytes) -> None:
        with _local_errors(self.child(key)):
            target = self._path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        with _local_errors(self.child(key)):
            return conditional.local_read(self._path(key))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        with _local_errors(self.child(key)):
            return conditional.local_put(self._path(key), data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        with _local_errors(self.child(key)):
            return conditional.local_put(self._path(key), data, etag)

    def delete_if_match(self, key: str, etag: str) -> bool:
        with _local_errors(self.child(key)):
            return conditional.local_delete(self._path(key), etag)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, threads: int = 16) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client(threads)
        self.threads = threads
        self.batch_deletes = True  # until the server refuses DeleteObjects
        self.transfer = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB,
                                       max_concurrency=max(1, min(threads, 10)))
        self._uploads = None  # the transfer manager of uploads with a deadline

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (key or self.prefix)

    full_key = _key  # the bucket key of a store key, for callers that use the client

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return list(self.iter_list(prefix))

    def iter_list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The objects under ``prefix``, page by page, in the server's (key) order."""
        full = self._key(prefix)
        if full and not full.endswith("/") and prefix == "":
            full += "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        with translated(self.child(prefix)):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # folder markers some tools create
                    yield ObjectInfo(obj["Key"][cut:], obj["Size"],
                                     obj.get("ETag", "").strip('"'))

    def folders(self, prefix: str = "") -> list[str]:
        full = self._key(prefix.strip("/"))
        full = f"{full}/" if full else ""
        names: list[str] = []
        with translated(self.child(prefix)):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/")
            for page in pages:
                names += [p["Prefix"][len(full):].rstrip("/")
                          for p in page.get("CommonPrefixes", [])]
        return sorted(n for n in names if n)

    def read_info(self, key: str) -> ObjectInfo | None:
        try:
            with translated(self.child(key)):
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and \
                    cause.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(key, head["ContentLength"], head.get("ETag", "").strip('"'))

    def get(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with translated(self.child(key)):
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
        os.replace(tmp, dest)

    def put(self, src: Path, key: str, until: Deadline | None = None) -> None:
        """Store the file ``src`` at ``key``. With ``until`` (a time on time.monotonic's
        clock, which may move later meanwhile), a transfer still running then is cancelled:
        a multipart upload is aborted, never completed, and its requests retry within
        UPLOAD_ATTEMPTS, so that none lands long after the deadline."""
        where = self.child(key)
        if until is None:
            with translated(where):
                self.client.upload_file(str(src), self.bucket, self._key(key),
                                        Config=self.transfer)
            return
        _before(until, where)
        if self._uploads is None:
            self._uploads = create_transfer_manager(
                s3_client(self.threads, attempts=UPLOAD_ATTEMPTS), self.transfer)
        future = self._uploads.upload(str(src), self.bucket, self._key(key))
        with translated(where):
            while not future.done():
                if time.monotonic() >= until():
                    future.cancel()
                    raise StorageError(f"{where}: upload cancelled: the run lock's lease ran "
                                       "out before it finished")
                time.sleep(0.05)
            future.result()

    def read_bytes(self, key: str) -> bytes | None:
        try:
            with translated(self.child(key)):
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and \
                    cause.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        with translated(self.child(key)):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def delete(self, keys: list[str]) -> None:
        """Delete in batches of 1000, or one key a request where the server refuses batches."""
        for start in range(0, len(keys), 1000):
            batch = [self._key(k) for k in keys[start:start + 1000]]
            if self.batch_deletes and self._delete_batch(batch):
                continue
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                list(pool.map(self._delete_one, batch))

    def _delete_batch(self, batch: list[str]) -> bool:
        """DeleteObjects; False where the server refuses it: older MinIO and Ceph want a
        Content-MD5, which boto3 >= 1.36 no longer sends (a CRC32 instead)."""
        try:
            with translated(self.uri):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
        except StorageError as exc:
            if _error_code(exc) not in BATCH_DELETE_REFUSED:
                raise
            log.info("%s refuses batch deletes (%s); deleting one key a request",
                     endpoint_name(), _error_code(exc))
            self.batch_deletes = False
            return False
        # A 200 answer still lists the keys it kept (denied, object lock); gone already is fine.
        errors = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            raise StorageError(
                f"could not delete {len(errors)} of {len(batch)} objects under {self.uri} "
                f"(first: s3://{self.bucket}/{errors[0].get('Key')}: {errors[0].get('Code')}): "
                "check that the job's identity may delete there (s3:DeleteObject) and that no "
                "object lock holds them")
        return True

    def _delete_one(self, key: str) -> None:
        with translated(f"s3://{self.bucket}/{key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        return conditional.s3_read(self.client, self.bucket, self._key(key), self.child(key))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        return conditional.s3_put(self.client, self.bucket, self._key(key), data,
                                  self.child(key))

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        return conditional.s3_put(self.client, self.bucket, self._key(key), data,
                                  self.child(key), etag)

    def delete_if_match(self, key: str, etag: str) -> bool:
        return conditional.s3_delete(self.client, self.bucket, self._key(key), etag,
                                     self.child(key))

    def check_bucket(self) -> None:
        """Fail fast, with a clear line, when the bucket is missing or unreadable."""
        where = f"s3://{self.bucket}"
        try:
            with translated(where):
                self.client.head_bucket(Bucket=self.bucket)
        except StorageError as exc:
            # HEAD responses carry no error body: only the status tells what went wrong.
            cause = exc.__cause__
            status = getattr(cause, "response", {}).get("ResponseMetadata", {}).get(
                "HTTPStatusCode")
            if status == 404:
                raise StorageError(f"bucket {self.bucket!r} does not exist at "
                                   f"{endpoint_name()}: create it or fix the URI") from cause
            if status in (401, 403):
                # A GET carries the error code that tells bad keys from a missing grant.
                with translated(where):
                    self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                raise StorageError(f"access denied to {where}: check the credentials and "
                                   "the bucket policy") from cause
            raise


def open_store(uri: str, threads: int = 16) -> Store:
    scheme, bucket, key = parse_uri(uri)
    if scheme == "s3":
        return S3Store(bucket, key, threads)
    return LocalStore(Path(key).expanduser().absolute())


def fetch(uri: str, cache_dir: Path, threads: int = 16, *, single: bool = False) -> FetchResult:
    """Make the data at ``uri`` available locally; S3 objects go through the download cache.

    ``uri`` names one object when it is an archive or ``single`` is set, else a prefix.

    The cache (``download``) is keyed by bucket/key plus ETag and size, so an unchanged
    dataset is never downloaded twice and a changed object is never served stale; objects
    deleted from a prefix disappear from its local mirror.
    """
    scheme, bucket, key = parse_uri(uri)
    if scheme == "file":
        path = Path(key).expanduser().absolute()
        if not path.exists():
            raise ConfigError(f"--data {uri}: no such file or folder")
        return FetchResult(path)
    store = S3Store(bucket, "", threads)
    store.check_bucket()
    is_archive = (single or key.lower().endswith(ARCHIVE_SUFFIXES)) and not key.endswith("/")
    started = time.monotonic()
    if is_archive:
        info = store.read_info(key)
        if info is None:
            raise StorageError(f"{uri} does not exist: check the key")
        base = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        result = download.mirror_object(store, info, base, cache_dir, threads)
    else:
        base = key.rstrip("/") + "/" if key else ""
        result = download.mirror_prefix(store, base, cache_dir, threads, uri)
    log.info("data: %d objects downloaded (%.1f MiB in %.1f s), %d from cache, %d removed",
             result.downloaded_objects, result.downloaded_bytes / MiB,
             time.monotonic() - started, result.cached_objects, result.removed_objects)
    return result


def _before(until: Deadline | None, where: str) -> None:
    """Refuse to start a write whose deadline has passed."""
    if until is not None and time.monotonic() >= until():
        raise StorageError(f"{where}: not sent: the run lock's lease ran out")


def _error_code(exc: StorageError) -> str:
    cause = exc.__cause__
    if isinstance(cause, botocore.exceptions.ClientError):
        return str(cause.response.get("Error", {}).get("Code", ""))
    return ""


@contextlib.contextmanager
def _local_errors(where: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot access {where}: {exc.strerror or exc}") from exc
