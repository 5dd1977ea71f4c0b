"""URIs: ``s3://bucket/key`` and local paths, and the store each one opens."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from trainjob.errors import ConfigError
from trainjob.store.base import Store
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store


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


def open_store(uri: str, threads: int = 16) -> Store:
    scheme, bucket, key = parse_uri(uri)
    if scheme == "s3":
        return S3Store(bucket, key, threads)
    return LocalStore(Path(key).expanduser().absolute())
