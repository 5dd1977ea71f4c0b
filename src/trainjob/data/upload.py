"""Putting a dataset into a store: one archive, or a folder of files, in parallel.

Large files go up as S3 multipart uploads (boto3's managed transfer, parts uploaded in
parallel); a file already stored with the same size and md5 (recorded as object metadata
by an earlier upload) is not sent again.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from trainjob.errors import ConfigError, StorageError
from trainjob.store import digests
from trainjob.store.base import Store
from trainjob.store.client import translated
from trainjob.store.s3 import S3Store
from trainjob.store.uri import open_store, parse_uri

log = logging.getLogger(__name__)

MiB = 1024**2
PART_SIZE = 16 * MiB  # multipart above this; 10,000 parts: files up to 160 GiB


@dataclass
class UploadReport:
    uris: list[str] = field(default_factory=list)
    uploaded: int = 0
    skipped: int = 0
    bytes: int = 0


def target_key(to: str, name: str) -> tuple[Store, str]:
    """The store and key for a file called ``name`` sent to ``to``: a URI ending in '/' is
    a folder (the file keeps its name), anything else names the object itself."""
    if to.endswith("/") or (parse_uri(to)[0] == "file" and Path(to).is_dir()):
        return open_store(to), name
    parent, _, key = to.rstrip("/").rpartition("/")
    if not key or parent.endswith(":/"):
        raise ConfigError(f"--to {to}: give s3://bucket/prefix/ (a folder, ending in /) or "
                          "s3://bucket/key")
    return open_store(parent), key


def upload_path(path: Path, to: str, *, threads: int = 16, part_size: int = PART_SIZE,
                md5: str | None = None) -> UploadReport:
    """Upload the file or folder ``path`` to ``to``; a folder keeps its layout under it."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    if path.is_file():
        store, key = target_key(to, path.name)
        files = [(path, key)]
    else:
        store = open_store(to.rstrip("/") + "/")
        files = [(p, p.relative_to(path).as_posix()) for p in sorted(path.rglob("*"))
                 if p.is_file()]
        if not files:
            raise ConfigError(f"{path} holds no files to upload")
    if isinstance(store, S3Store):
        store.check_bucket()
    report = UploadReport()

    def send(item: tuple[Path, str]) -> tuple[str, bool, int]:
        src, key = item
        sent = put_file(store, src, key, part_size=part_size,
                        md5=md5 if len(files) == 1 else None, threads=threads)
        return store.child(key), sent, src.stat().st_size

    # Files in parallel; a big file's parts in parallel too (boto3's own pool).
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        for uri, sent, size in pool.map(send, files):
            report.uris.append(uri)
            report.uploaded += sent
            report.skipped += not sent
            report.bytes += size if sent else 0
    return report


def put_file(store: Store, src: Path, key: str, *, part_size: int = PART_SIZE,
             md5: str | None = None, threads: int = 16) -> bool:
    """Store ``src`` at ``key``; False when the same bytes (size and md5) are there."""
    if not isinstance(store, S3Store):
        store.put(src, key)
        return True
    digest = md5 or digests.md5(src)
    size = src.stat().st_size
    if _already_there(store, key, size, digest):
        log.info("%s is already stored (same size and md5)", store.child(key))
        return False
    config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                            max_concurrency=max(1, min(threads, 10)))
    with translated(store.child(key)):
        store.client.upload_file(str(src), store.bucket, store.full_key(key), Config=config,
                                 ExtraArgs={"Metadata": {"md5": digest}})
    return True


def _already_there(store: S3Store, key: str, size: int, md5: str) -> bool:
    try:
        with translated(store.child(key)):
            head = store.client.head_object(Bucket=store.bucket, Key=store.full_key(key))
    except StorageError:
        return False  # missing (or unreadable): upload, and let that report any real error
    return head.get("ContentLength") == size and head.get("Metadata", {}).get("md5") == md5
