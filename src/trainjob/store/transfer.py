"""Object downloads for ``fetch``: whole objects straight to local files, atomically.

Small objects cost CPU, not bandwidth: s3transfer's ``download_file`` spends ~3 ms per call
on its futures and thread pools, and botocore's full request pipeline ~2 ms more (events,
endpoint rules, response parsing, urllib3). So each object takes plain GETs, signed by
botocore (SigV4) with the client's own credentials, on one kept-alive ``http.client``
connection per thread with the client's trust settings and time-outs: one GET for a small
object, parallel ranged GETs written in place (``pwrite``) for a large one, each pinned to
the listed ETag. Anything but a complete answer is done again through the full client call
(``get_object``, or s3transfer for large objects), which brings botocore's retries and error
messages; after a few refusals the fast path turns itself off. A proxy or a client
certificate, which plain ``http.client`` does not do as botocore does, means full calls.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

import botocore.auth
import botocore.awsrequest
import botocore.exceptions
import botocore.httpsession
from boto3.s3.transfer import create_transfer_manager
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from trainjob.errors import StorageError
from trainjob.store.client import describe_error, signing_credentials, translated

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
        self._fast = self._made = _FastGet.create(client, bucket)
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
        if self._made is not None:
            self._made.close()
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
    """Signed GETs on persistent ``http.client`` connections, one per thread. Each method
    answers what it got, or a few words on why not (then the caller takes the full call).

    Why not botocore's own connection pool: urllib3 and botocore's response wrapping cost
    ~0.4 ms of CPU per request, as much as the rest of a small object's download."""

    def __init__(self, credentials, region: str, base_url: str, timeout: float,
                 context: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        self.credentials, self.region, self.base_url = credentials, region, base_url
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.timeout, self.context = timeout, context
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @classmethod
    def create(cls, client, bucket: str) -> _FastGet | None:
        # None (every GET takes the full client call) where nothing signs, or where the
        # client's connections need what plain http.client lacks: a proxy, a client cert.
        http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        credentials = signing_credentials(client)
        if http is None or credentials is None or getattr(http, "_cert_file", None):
            return None
        # Let botocore resolve the URL (path or virtual-host style, regional endpoint) once,
        # by presigning a GET of a one-letter key. The signing region is the client's: where
        # the bucket lives elsewhere, the server refuses and the full call redirects.
        try:
            url = client.generate_presigned_url("get_object", ExpiresIn=60,
                                                Params={"Bucket": bucket, "Key": "k"})
            proxied = http._proxy_config.proxy_url_for(url)
        except (botocore.exceptions.BotoCoreError, AttributeError):
            return None
        base = url.split("?", 1)[0]
        if proxied or not base.endswith("/k") or not base.startswith(("http://", "https://")):
            return None
        context = None
        if base.startswith("https://"):  # the trust botocore would use (AWS_CA_BUNDLE, verify)
            verify = getattr(http, "_verify", True)
            if verify is False:
                context = ssl._create_unverified_context()
            else:
                cert = botocore.httpsession.get_cert_path(verify)
                context = ssl.create_default_context(
                    cafile=None if os.path.isdir(cert) else cert,
                    capath=cert if os.path.isdir(cert) else None)
        config = client.meta.config
        return cls(credentials, client.meta.region_name or "us-east-1", base[:-1],
                   max(config.connect_timeout, config.read_timeout), context)

    def get(self, key: str, tmp: Path) -> tuple[str, int] | str:
        """(ETag, size) once ``tmp`` holds the whole object."""
        answer = self._request(key, {})
        if isinstance(answer, str):
            return answer
        conn, response = answer
        if response.status != 200:
            return self._discard(conn, response, f"HTTP {response.status}")
        written = 0
        try:
            with open(tmp, "wb") as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as exc:  # network
                        conn.close()
                        return type(exc).__name__
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
        except OSError:
            conn.close()
            raise  # a local problem, not a miss: the caller reports it
        expected = response.getheader("Content-Length")
        if expected is not None and int(expected) != written:
            conn.close()
            return "short read"
        return (response.getheader("ETag") or "").strip('"'), written

    def get_range(self, key: str, start: int, end: int, etag: str, fd: int) -> str | None:
        """Bytes ``start``..``end`` of the version ``etag``, written at the same offsets of
        ``fd``; None when done."""
        answer = self._request(key, {"Range": f"bytes={start}-{end}", "If-Match": f'"{etag}"'})
        if isinstance(answer, str):
            return answer
        conn, response = answer
        if response.status != 206:
            return self._discard(conn, response, f"HTTP {response.status}")
        if response.getheader("Content-Length") != str(end + 1 - start) or not \
                (response.getheader("Content-Range") or "").startswith(f"bytes {start}-{end}/"):
            conn.close()
            return "unexpected range"
        view, offset = memoryview(bytearray(CHUNK)), start
        while offset <= end:
            try:
                got = response.readinto(view[:min(CHUNK, end + 1 - offset)])
            except (OSError, http.client.HTTPException) as exc:  # network
                conn.close()
                return type(exc).__name__
            if not got:
                break
            done = 0
            try:
                while done < got:  # pwrite may write less than asked
                    done += os.pwrite(fd, view[done:got], offset + done)
            except OSError:
                conn.close()
                raise
            offset += got
        if offset != end + 1:
            conn.close()
            return "short read"
        return None

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()

    def _request(self, key: str, headers: dict[str, str]
                 ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse] | str:
        path = self.path + quote(key, safe="/~")
        request = botocore.awsrequest.AWSRequest("GET", self.base_url + path[len(self.path):],
                                                 headers=headers)
        botocore.auth.S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3",
                                  self.region).add_auth(request)
        signed = dict(request.headers.items())
        conn = getattr(self._local, "conn", None)
        for fresh in (conn is None, True):
            if fresh:
                conn = self._connect()
            try:
                conn.request("GET", path, headers=signed)
                return conn, conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if fresh:  # a kept-alive connection the server had closed gets one retry
                    return type(exc).__name__
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        if self.context is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        else:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.context)
        self._local.conn = conn
        with self._lock:
            self._opened.append(conn)
        return conn

    @staticmethod
    def _discard(conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 why: str) -> str:
        try:
            response.read()  # a short error document: read it, and the connection stays usable
        except (OSError, http.client.HTTPException):
            conn.close()
        return why
