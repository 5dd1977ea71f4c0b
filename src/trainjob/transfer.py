"""Object downloads for ``fetch``: whole objects straight to local files, atomically.

Small objects cost CPU, not bandwidth: s3transfer's ``download_file`` spends ~3 ms per call
on its futures and thread pools, and botocore's full request pipeline ~2-3 ms more (events,
endpoint rules, response parsing). So each object takes plain SigV4-signed GETs, signed by
botocore with the client's own credentials and sent through the client's own connection
pool (its TLS, proxy and timeout settings): one GET for a small object, parallel ranged GETs
written in place (``pwrite``) for a large one, each pinned to the listed ETag. Anything but
a complete answer is done again through the full client call (``get_object``, or
s3transfer for large objects), which brings botocore's retries and error messages; after a
few such misses the fast path turns itself off.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import botocore.auth
import botocore.awsrequest
import botocore.exceptions
from boto3.s3.transfer import create_transfer_manager
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from trainjob.errors import StorageError
from trainjob.s3client import describe_error, signing_credentials, translated

log = logging.getLogger(__name__)

MiB = 1024**2
PART = 16 * MiB  # ranged GETs of a large object
LARGE = 2 * PART  # below this, one stream is as fast
MAX_PARTS_AT_ONCE = 8
CHUNK = 1 * MiB
MAX_MISSES = 3  # refused fast GETs before the fast path is dropped
REFUSALS = {"HTTP 400", "HTTP 401", "HTTP 403", "HTTP 405", "HTTP 501",
            "HTTP 200",  # to a ranged GET: the server ignores Range
            "unexpected range"}
ATTEMPTS = 5  # reads of an object whose body is cut short (s3transfer's number)


class ObjectReader:
    """Writes objects of one bucket to local files atomically; safe to share across threads.
    Close it to stop its helper threads."""

    def __init__(self, client, bucket: str, transfer_config, threads: int) -> None:
        self.client = client
        self.bucket = bucket
        self.transfer_config = transfer_config
        self.fast_gets = 0  # objects that came through the fast path (tests, profile)
        self._fast = _FastGet.create(client, bucket)
        self._parts = max(1, min(threads, MAX_PARTS_AT_ONCE))
        self._misses = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # ranged parts
        self._manager = None  # s3transfer, the large objects' slow path

    def download(self, key: str, size: int, etag: str, dest: Path) -> tuple[str, int]:
        """Put object ``key`` at ``dest``; return the ETag and size of what was written.

        The object goes to a temporary name beside ``dest``, renamed only when complete, so
        ``dest`` never holds part of an object.
        """
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.part")
        where = f"s3://{self.bucket}/{key}"
        try:
            if size >= LARGE:
                got = self._fast_ranged(key, size, etag, tmp) or \
                    self._get_large(key, size, etag, tmp, where)
            else:
                got = self._fast_get(key, tmp) or self._get(key, tmp, where)
            os.replace(tmp, dest)
        except OSError as exc:
            raise StorageError(f"cannot write {dest} for {where}: "
                               f"{exc.strerror or exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return got

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        if self._manager is not None:
            self._manager.shutdown()

    def _fast_get(self, key: str, tmp: Path) -> tuple[str, int] | None:
        fast = self._fast
        if fast is None:
            return None
        outcome = fast.get(key, tmp)
        return self._count(outcome)

    def _fast_ranged(self, key: str, size: int, etag: str, tmp: Path) -> tuple[str, int] | None:
        fast = self._fast
        if fast is None or not etag:
            return None
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._parts, thread_name_prefix="fetch-part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            parts = [(start, min(size, start + PART) - 1) for start in range(0, size, PART)]
            failures = [r for r in self._pool.map(
                lambda part: fast.get_range(key, part[0], part[1], etag, fd), parts) if r]
        finally:
            os.close(fd)
        return self._count(failures[0] if failures else (etag, size))

    def _count(self, outcome: tuple[str, int] | str) -> tuple[str, int] | None:
        if isinstance(outcome, tuple):
            self.fast_gets += 1  # a lost update under races only skews a statistic
            return outcome
        # Throttling, cut connections, a vanished object: this object takes the full call.
        # A refusal of the request itself (signature, region, redirect, no Range support)
        # would repeat for every object: after a few, stop trying.
        if outcome in REFUSALS or outcome.startswith("HTTP 3"):
            with self._lock:
                self._misses += 1
                if self._misses >= MAX_MISSES and self._fast is not None:
                    log.info("direct GETs to s3://%s are refused (%s); using the full client "
                             "for the rest", self.bucket, outcome)
                    self._fast = None
        return None

    def _get(self, key: str, tmp: Path, where: str) -> tuple[str, int]:
        # botocore retries the request; a body cut short is retried here, as s3transfer does.
        failure: Exception | None = None
        for _ in range(ATTEMPTS):
            with translated(where):
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            body, written, failure = response["Body"], 0, None
            with open(tmp, "wb") as out:
                while True:
                    try:
                        chunk = body.read(CHUNK)
                    except S3_RETRYABLE_DOWNLOAD_ERRORS as exc:
                        failure = exc
                        break
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
            if failure is None and written == response["ContentLength"]:
                return response.get("ETag", "").strip('"'), written
        raise StorageError(describe_error(failure, where) if failure else
                           f"{where}: the connection kept closing early; run again")

    def _get_large(self, key: str, size: int, etag: str, tmp: Path,
                   where: str) -> tuple[str, int]:
        with self._lock:
            if self._manager is None:
                self._manager = create_transfer_manager(self.client, self.transfer_config)
        try:
            with translated(where):
                self._manager.download(self.bucket, key, str(tmp),
                                       subscribers=[_Expected(size, etag)]).result()
        except S3DownloadFailedError as exc:  # If-Match failed: a newer version is there
            raise StorageError(f"{where} changed while it was being downloaded: "
                               "run again") from exc
        except RetriesExceededError as exc:
            raise StorageError(describe_error(exc.last_exception, where)) from exc
        return etag, tmp.stat().st_size


class _Expected(BaseSubscriber):
    """Pins an s3transfer download to the listed size and ETag: every part is sent If-Match,
    so a file never mixes two versions and the ETag we record is the one we wrote."""

    def __init__(self, size: int, etag: str) -> None:
        self.size, self.etag = size, etag

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self.size)
        if self.etag:
            future.meta.provide_object_etag(f'"{self.etag}"')


class _FastGet:
    """Signed GETs through the client's connection pool. Each method answers what it got,
    or a few words on why not (then the caller takes the full client call)."""

    def __init__(self, http, credentials, region: str, base_url: str) -> None:
        self.http, self.credentials, self.region, self.base_url = \
            http, credentials, region, base_url

    @classmethod
    def create(cls, client, bucket: str) -> _FastGet | None:
        # The client's pool and its credentials object; None where botocore's insides differ
        # or nothing signs (then every GET takes the full client call).
        http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        credentials = signing_credentials(client)
        if http is None or not hasattr(http, "send") or credentials is None:
            return None
        # Let botocore resolve the URL (path or virtual-host style, regional endpoint) once,
        # by presigning a GET of a one-letter key. The signing region is the client's: where
        # the bucket lives elsewhere, the server refuses and the full call redirects.
        try:
            url = client.generate_presigned_url("get_object", ExpiresIn=60,
                                                Params={"Bucket": bucket, "Key": "k"})
        except botocore.exceptions.BotoCoreError:
            return None
        base = url.split("?", 1)[0]
        if not base.endswith("/k"):
            return None
        return cls(http, credentials, client.meta.region_name or "us-east-1", base[:-1])

    def get(self, key: str, tmp: Path) -> tuple[str, int] | str:
        """(ETag, size) once ``tmp`` holds the whole object."""
        response = self._send(key, {})
        if isinstance(response, str):
            return response
        raw = response.raw
        if response.status_code != 200:
            raw.drain_conn()
            return f"HTTP {response.status_code}"
        written = 0
        try:
            with open(tmp, "wb") as out:
                while True:
                    try:
                        chunk = raw.read(CHUNK)
                    except Exception as exc:  # noqa: BLE001 - network: the full call decides
                        raw.close()
                        return type(exc).__name__
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
        except OSError:
            raw.close()
            raise  # a local problem, not a miss: the caller reports it
        expected = response.headers.get("Content-Length")
        if expected is not None and int(expected) != written:
            raw.close()
            return "short read"
        raw.release_conn()
        return response.headers.get("ETag", "").strip('"'), written

    def get_range(self, key: str, start: int, end: int, etag: str, fd: int) -> str | None:
        """Bytes ``start``..``end`` of the version ``etag``, written at the same offsets of
        ``fd``; None when done."""
        response = self._send(key, {"Range": f"bytes={start}-{end}", "If-Match": f'"{etag}"'})
        if isinstance(response, str):
            return response
        raw = response.raw
        if response.status_code != 206:
            raw.drain_conn()
            return f"HTTP {response.status_code}"
        if response.headers.get("Content-Length") != str(end + 1 - start) or not \
                response.headers.get("Content-Range", "").startswith(f"bytes {start}-{end}/"):
            raw.close()
            return "unexpected range"
        view, offset = memoryview(bytearray(CHUNK)), start
        while offset <= end:
            try:
                got = raw.readinto(view[:min(CHUNK, end + 1 - offset)])
            except Exception as exc:  # noqa: BLE001 - network: the full call decides
                raw.close()
                return type(exc).__name__
            if not got:
                break
            done = 0
            try:
                while done < got:  # pwrite may write less than asked
                    done += os.pwrite(fd, view[done:got], offset + done)
            except OSError:
                raw.close()
                raise
            offset += got
        if offset != end + 1:
            raw.close()
            return "short read"
        raw.release_conn()
        return None

    def _send(self, key: str, headers: dict[str, str]):  # -> AWSResponse | str
        request = botocore.awsrequest.AWSRequest(
            "GET", self.base_url + quote(key, safe="/~"), headers=headers)
        botocore.auth.S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3",
                                  self.region).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True
        try:
            return self.http.send(prepared)
        except botocore.exceptions.BotoCoreError as exc:
            return type(exc).__name__
