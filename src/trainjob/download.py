"""The download cache: S3 objects mirrored under ``<cache>/s3/<bucket>/<key>``, checked
against an index of ETag and size, downloaded in parallel, and shared by the jobs on one host.

One job updates a mirror while the others wait (``cache.ensure``). A prefix's mirror, which
training reads all run long, stays locked (shared) for the run within a ``cache.session()``,
so no other job rewrites or prunes it under a running one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainjob import cache
from trainjob.errors import StorageError

if TYPE_CHECKING:  # storage imports this module: no import back at run time
    from trainjob.storage import ObjectInfo, S3Store

log = logging.getLogger(__name__)

MiB = 1024**2


@dataclass
class FetchResult:
    path: Path
    downloaded_objects: int = 0
    downloaded_bytes: int = 0
    cached_objects: int = 0


def mirror(store: S3Store, objects: list[ObjectInfo], base: str, cache_dir: Path, threads: int,
           *, prefix: bool) -> FetchResult:
    """Bring ``objects`` (keys under ``base``) into the cache. For a ``prefix``, also drop
    local copies of objects the bucket no longer has, and hold the mirror for the session."""
    local_root = cache_dir / "s3" / store.bucket / base
    digest = hashlib.sha1(f"{store.bucket}/{base}".encode()).hexdigest()
    index_path = cache_dir / "index" / f"{digest}.json"
    result = FetchResult(local_root)
    plan: dict = {}

    def ready() -> bool:
        plan.update(_plan(objects, base, local_root, index_path, mirror=prefix))
        return not plan["todo"] and not plan["stale"]

    def build() -> None:
        _sync_down(store, plan["todo"], plan["index"], index_path,
                   f"s3://{store.bucket}/{base}", local_root, threads, result)
        if prefix:
            _prune(local_root, {o.key[len(base):] for o in objects})

    # One lock per kind: a job holding a prefix's mirror can still fetch weights beside it.
    kind = "prefix" if prefix else "object"
    cache.ensure(local_root, ready=ready, build=build, hold=prefix,
                 lock_file=cache_dir / "locks" / f"{kind}-{digest}.lock")
    result.cached_objects = len(objects) - len(plan["todo"])
    log.info("data: %d objects downloaded, %d from cache", result.downloaded_objects,
             result.cached_objects)
    return result


def _plan(objects: list[ObjectInfo], base: str, local_root: Path, index_path: Path, *,
          mirror: bool) -> dict:
    """What an update needs: the index, the objects to download, and (for a prefix's mirror)
    the local files no longer in the bucket."""
    index = {}
    if index_path.exists():
        with contextlib.suppress(ValueError):
            index = json.loads(index_path.read_text())
    todo = []
    for obj in objects:
        rel = obj.key[len(base):]
        local = local_root / rel
        if not (index.get(rel) == [obj.etag, obj.size] and local.is_file()
                and local.stat().st_size == obj.size):
            todo.append((obj, rel, local))
    keep = {o.key[len(base):] for o in objects}
    stale = [p for p in local_root.rglob("*") if p.is_file()
             and p.relative_to(local_root).as_posix() not in keep] if mirror else []
    return {"index": index, "todo": todo, "stale": stale}


def _sync_down(store: S3Store, todo: list[tuple[ObjectInfo, str, Path]], index: dict,
               index_path: Path, where: str, local_root: Path, threads: int,
               result: FetchResult) -> None:
    lock = threading.Lock()

    def download(item: tuple[ObjectInfo, str, Path]) -> None:
        obj, rel, local = item
        check_inside(local_root, local, store.child(obj.key))
        store.get(obj.key, local)
        with lock:
            index[rel] = [obj.etag, obj.size]
            result.downloaded_objects += 1
            result.downloaded_bytes += obj.size

    if not todo:
        return
    log.info("downloading %d objects (%.1f MiB) from %s", len(todo),
             sum(o.size for o, _, _ in todo) / MiB, where)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(download, todo))
    finally:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f".{index_path.name}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)  # a reader never sees half an index


def _prune(local_root: Path, keep: set[str]) -> None:
    """Drop cached copies of objects no longer under the prefix: the mirror is never stale."""
    for path in sorted(local_root.rglob("*"), reverse=True):
        rel = path.relative_to(local_root).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def check_inside(root: Path, path: Path, what: str) -> Path:
    """``path``, if it stays inside ``root``; an object key such as ``a//etc/x`` or
    ``a/../../x`` would otherwise write anywhere on the disk."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise StorageError(f"{what}: object key escapes the local folder {root}; refusing it")
    return path
