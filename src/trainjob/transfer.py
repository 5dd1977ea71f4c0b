"""Object downloads for ``fetch``: whole objects straight to local files, atomically.

Small objects cost CPU, not bandwidth: s3transfer's ``download_file`` spends ~3 ms per call
on its futures and thread pools, and botocore's full request pipeline ~3 ms more (events,
endpoint rules, response parsing). So an object under ``LARGE`` takes one SigV4-signed GET,
signed by botocore with the client's own credentials and sent through the client's own
connection pool (its TLS, proxy and timeout settings). Anything but a complete 200 answer is
done again through the full client call, which brings botocore's retries and error
messages; after a few such misses the fast path turns itself off. Large objects go through
s3transfer's parallel ranged GETs, pinned to the listed ETag.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from urllib.parse import quote

import botocore.auth
import botocore.awsrequest
import botocore.exceptions
from boto3.s3.transfer import create_transfer_manager
from s3transfer.subscribers import BaseSubscriber

from trainjob.errors import StorageError
from trainjob.s3client import signing_credentials, translated

log = logging.getLogger(__name__)

MiB = 1024**2
LARGE = 32 * MiB  # from here on, parallel ranged GETs beat one stream
CHUNK = 1 * MiB
MAX_MISSES = 3  # fast GETs answered with anything but 200 before the fast path is dropped


class ObjectReader:
    """Writes objects of one bucket to local files atomically; safe to share across threads."""

    def __init__(self, client, bucket: str, transfer_config) -> None:
        self.client = client
        self.bucket = bucket
        self.transfer_config = transfer_config
        self.fast_gets = 0  # how many objects came through the fast path (tests, profile)
        self._fast = _FastGet.create(client, bucket)
        self._misses = 0
        self._lock = threading.Lock()
        self._manager = None

    def download(self, key: str, size: int, etag: str, dest: Path) -> tuple[str, int]:
        """Put object ``key`` at ``dest``; return the ETag and size of what was written.

        The object is written to a temporary name beside ``dest`` and renamed only when
        complete, so ``dest`` never holds part of an object.
        """
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.part")
        where = f"s3://{self.bucket}/{key}"
        try:
            if size >= LARGE:
                got = self._get_large(key, size, etag, tmp, where)
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
        if self._manager is not None:
            self._manager.shutdown()

    def _fast_get(self, key: str, tmp: Path) -> tuple[str, int] | None:
        if self._fast is None:
            return None
        status = self._fast.get(key, tmp)
        if isinstance(status, tuple):
            self.fast_gets += 1  # a lost update under races only skews a statistic
            return status
        with self._lock:
            self._misses += 1
            if self._misses >= MAX_MISSES and self._fast is not None:
                log.info("direct GETs to s3://%s were refused (last: %s); using the full "
                         "client for the rest", self.bucket, status)
                self._fast = None
        return None

    def _get(self, key: str, tmp: Path, where: str) -> tuple[str, int]:
        with translated(where):
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            with open(tmp, "wb") as out:
                written = _copy(body.read, out)
        if written != response["ContentLength"]:
            raise StorageError(f"{where}: connection closed after {written} of "
                               f"{response['ContentLength']} bytes; run again")
        return response.get("ETag", "").strip('"'), written

    def _get_large(self, key: str, size: int, etag: str, tmp: Path,
                   where: str) -> tuple[str, int]:
        with self._lock:
            if self._manager is None:
                self._manager = create_transfer_manager(self.client, self.transfer_config)
        try:
            with translated(where):
                self._manager.download(self.bucket, key, str(tmp),
                                       subscribers=[_Expected(size, etag)]).result()
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and cause.response.get(
                    "Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise StorageError(f"{where} changed while it was being downloaded: "
                                   "run again") from cause
            raise
        return etag, tmp.stat().st_size


class _Expected(BaseSubscriber):
    """Pins a ranged download to the listed size and ETag: every part is sent If-Match, so
    a file never mixes two versions and the ETag we record is the one we wrote."""

    def __init__(self, size: int, etag: str) -> None:
        self.size, self.etag = size, etag

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self.size)
        if self.etag:
            future.meta.provide_object_etag(f'"{self.etag}"')


class _FastGet:
    """One signed GET per object through the client's connection pool."""

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
        """(ETag, size) once ``tmp`` holds the whole object; else why not, in a few words."""
        request = botocore.awsrequest.AWSRequest(
            "GET", self.base_url + quote(key, safe="/~"))
        botocore.auth.S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3",
                                  self.region).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True
        try:
            response = self.http.send(prepared)
        except botocore.exceptions.BotoCoreError as exc:
            return type(exc).__name__
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


def _copy(read, out) -> int:
    written = 0
    while chunk := read(CHUNK):
        out.write(chunk)
        written += len(chunk)
    return written

