"""What every store is: a folder-like location of objects (a local directory or an S3
bucket and prefix) behind one small interface, and the helpers both kinds share."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainjob.errors import StorageError

log = logging.getLogger(__name__)


MiB = 1024**2


Deadline = Callable[[], float]  # when a write must be done by, on time.monotonic's clock


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int
    etag: str


class Store:
    """A folder-like location: a local directory or an S3 bucket + prefix."""

    uri: str

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def get(self, key: str, dest: Path) -> None: ...
    def put(self, src: Path, key: str, until: Deadline | None = None) -> None: ...
    def read_bytes(self, key: str) -> bytes | None: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def delete(self, keys: list[str]) -> None: ...

    def copy(self, src: str, dst: str) -> None:
        """Make ``dst`` hold what ``src`` holds, inside the store (no upload)."""

    def folders(self, prefix: str = "") -> list[str]:
        """The names of the folders directly under ``prefix`` (one level, sorted)."""

    def exists(self, key: str) -> bool:
        return self.read_info(key) is not None

    def read_info(self, key: str) -> ObjectInfo | None: ...

    # Compare-and-swap (see conditional.py): the new ETag, or None/False when another
    # writer got there first (412). ``read_versioned`` gives the ETag to compare against.
    def read_versioned(self, key: str) -> tuple[bytes, str] | None: ...
    def put_if_absent(self, key: str, data: bytes) -> str | None: ...
    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None: ...
    def delete_if_match(self, key: str, etag: str) -> bool: ...

    def child(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def read_json(self, key: str) -> dict | None:
        data = self.read_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            log.warning("ignoring unreadable %s", self.child(key))
            return None

    def write_json(self, key: str, obj: object) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())


def check_deadline(until: Deadline | None, where: str) -> None:
    """Refuse to start a write whose deadline has passed."""
    if until is not None and time.monotonic() >= until():
        raise StorageError(f"{where}: not sent: the run lock's lease ran out")


@contextlib.contextmanager
def local_errors(where: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot access {where}: {exc.strerror or exc}") from exc


def check_inside(root: Path, path: Path, what: str) -> Path:
    """``path``, if it stays inside ``root``; an object key such as ``a//etc/x`` or
    ``a/../../x`` would otherwise write anywhere on the disk."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise StorageError(f"{what}: object key escapes the local folder {root}; refusing it")
    return path
