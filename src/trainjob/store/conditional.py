"""Compare-and-swap on one object, the primitive the run lock is built on.

S3: ``If-None-Match: *`` creates an object only where none exists, ``If-Match: <etag>``
replaces or deletes it only while it is the version the caller last saw (AWS S3 since 2024,
MinIO, SeaweedFS). A 412 (or AWS' 409 ConditionalRequestConflict, a concurrent conditional
write that won) means "someone else changed it": these functions return None/False then.

Local folders: the same contract from a hard link (atomic create-if-absent of a complete
file) and a compare-by-content under an ``flock`` on the folder. The ETag of a local object
is the MD5 of its bytes, like S3's for a single PUT.

``storage.LocalStore`` and ``storage.S3Store`` expose these as methods; other failures
leave as one-line StorageErrors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions

from trainjob.errors import ConditionalWritesUnsupported, StorageError
from trainjob.store.client import translated

# Codes meaning "the precondition did not hold": another writer changed the object.
CHANGED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# If-Match on a missing object: AWS and moto answer 404 NoSuchKey, SeaweedFS 412.
MISSING = {"NoSuchKey", "404", "NotFound"}
UNSUPPORTED = {"NotImplemented", "501"}


def _code(exc: StorageError) -> str:
    cause = exc.__cause__
    if isinstance(cause, botocore.exceptions.ClientError):
        err = cause.response.get("Error", {})
        return str(err.get("Code") or cause.response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode", ""))
    return ""


def s3_read(client, bucket: str, key: str, where: str) -> tuple[bytes, str] | None:
    """The object's bytes and ETag (as the server spells it), or None if it is missing."""
    try:
        with translated(where):
            resp = client.get_object(Bucket=bucket, Key=key)
            return resp["Body"].read(), resp["ETag"]
    except StorageError as exc:
        if _code(exc) in MISSING:
            return None
        raise


def s3_put(client, bucket: str, key: str, data: bytes, where: str,
           etag: str | None = None) -> str | None:
    """PUT only if absent (``etag`` None) or only over ``etag``; the new ETag, or None."""
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        with translated(where):
            return client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except StorageError as exc:
        code = _code(exc)
        if code in CHANGED or (etag is not None and code in MISSING):
            return None
        if code in UNSUPPORTED:
            raise ConditionalWritesUnsupported(
                f"{where}: the S3 server does not implement conditional writes ({code})") from exc
        raise


def s3_delete(client, bucket: str, key: str, etag: str, where: str) -> bool:
    """DELETE only while the object's ETag is ``etag``; False if it changed or is gone."""
    try:
        with translated(where):
            client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        return True
    except StorageError as exc:
        code = _code(exc)
        if code in CHANGED or code in MISSING:
            return False
        if code in UNSUPPORTED:
            raise ConditionalWritesUnsupported(
                f"{where}: the S3 server does not implement conditional deletes ({code})") from exc
        raise


def local_etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def local_read(path: Path) -> tuple[bytes, str] | None:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return data, local_etag(data)


def local_put(path: Path, data: bytes, etag: str | None = None) -> str | None:
    """Write ``path`` only if absent (``etag`` None) or only while its content has ``etag``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_locked(path.parent):
        if etag is not None:
            current = local_read(path)
            if current is None or current[1] != etag:
                return None
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        tmp.write_bytes(data)
        try:
            if etag is not None:
                os.replace(tmp, path)  # readers never see half a file
            elif not _link_if_absent(tmp, path, data):
                return None
        finally:
            tmp.unlink(missing_ok=True)
    return local_etag(data)


def local_delete(path: Path, etag: str) -> bool:
    if not path.parent.is_dir():
        return False
    with _folder_locked(path.parent):
        current = local_read(path)
        if current is None or current[1] != etag:
            return False
        path.unlink()
        return True


def _link_if_absent(tmp: Path, path: Path, data: bytes) -> bool:
    """Create ``path`` with ``tmp``'s content unless it exists: a hard link is atomic and
    never shows a partial file; O_EXCL serves file systems without hard links."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself: serialises compare-and-swap between
    processes on this host (and on NFS v4, which maps flock to byte-range locks)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
