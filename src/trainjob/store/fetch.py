"""``fetch``: a dataset or weights file made available locally, S3 objects through the
download cache (mirror.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from trainjob.errors import ConfigError, StorageError
from trainjob.store import mirror
from trainjob.store.base import MiB
from trainjob.store.mirror import FetchResult
from trainjob.store.s3 import S3Store
from trainjob.store.uri import parse_uri

log = logging.getLogger(__name__)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


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
        result = mirror.mirror_object(store, info, base, cache_dir, threads)
    else:
        base = key.rstrip("/") + "/" if key else ""
        result = mirror.mirror_prefix(store, base, cache_dir, threads, uri)
    log.info("data: %d objects downloaded (%.1f MiB in %.1f s), %d from cache, %d removed",
             result.downloaded_objects, result.downloaded_bytes / MiB,
             time.monotonic() - started, result.cached_objects, result.removed_objects)
    return result
