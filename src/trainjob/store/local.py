"""A local folder as a store: the same interface and contract as S3, conditional writes
included (conditional.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trainjob.store import conditional
from trainjob.store.base import Deadline, ObjectInfo, Store, check_deadline, local_errors


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
        with local_errors(self.child(key)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(key), dest)

    def put(self, src: Path, key: str, until: Deadline | None = None) -> None:
        target = self._path(key)
        if target.resolve() == src.resolve():
            return
        check_deadline(until, self.child(key))  # a local copy takes no time worth cancelling
        with local_errors(self.child(key)):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)  # readers never see half a file

    def read_bytes(self, key: str) -> bytes | None:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None

    def write_bytes(self, key: str, data: bytes) -> None:
        with local_errors(self.child(key)):
            target = self._path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)

    def copy(self, src: str, dst: str) -> None:
        with local_errors(self.child(dst)):
            target = self._path(dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(self._path(src), tmp)
            os.replace(tmp, target)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        with local_errors(self.child(key)):
            return conditional.local_read(self._path(key))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        with local_errors(self.child(key)):
            return conditional.local_put(self._path(key), data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        with local_errors(self.child(key)):
            return conditional.local_put(self._path(key), data, etag)

    def delete_if_match(self, key: str, etag: str) -> bool:
        with local_errors(self.child(key)):
            return conditional.local_delete(self._path(key), etag)
