"""``s3://`` and local URIs behind one small interface: list, get, put, delete, with retries;
and ``fetch``, the cached, parallel download of a dataset (the cache itself: ``download``).

All S3 traffic goes through ``s3client``: one boto3 client built from boto3's own credential
chain (env keys, profiles, IRSA, instance roles), pointed at MinIO, Ceph or any
S3-compatible server by ``AWS_ENDPOINT_URL``. Every botocore failure leaves this module as a
one-line ``StorageError``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import botocore.exceptions
from boto3.s3.transfer import TransferConfig, create_transfer_manager

from trainjob.errors import StorageError
from trainjob.store import conditional
from trainjob.store.base import Deadline, MiB, ObjectInfo, Store, check_deadline
from trainjob.store.client import endpoint_name, s3_client, translated

log = logging.getLogger(__name__)


# Attempts of each request of an upload with a deadline (the run folder's): one request
# then lasts at most 4 x (10 s to connect + 60 s to read) plus backoff, under 300 s, half
# the run lock's stale time: a write begun inside the lease lands before another job may
# take the lock over, or not at all. The uploader itself retries, checking the lease first.
UPLOAD_ATTEMPTS = 4


# DeleteObjects errors meaning "this server takes no batch deletes like that": one key a time.
BATCH_DELETE_REFUSED = {"MissingContentMD5", "InvalidRequest", "InvalidDigest", "NotImplemented"}


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
        check_deadline(until, where)
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

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy (multipart above the threshold): no byte leaves the store."""
        with translated(self.child(dst)):
            self.client.copy({"Bucket": self.bucket, "Key": self._key(src)}, self.bucket,
                             self._key(dst), Config=self.transfer)

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


def _error_code(exc: StorageError) -> str:
    cause = exc.__cause__
    if isinstance(cause, botocore.exceptions.ClientError):
        return str(cause.response.get("Error", {}).get("Code", ""))
    return ""
