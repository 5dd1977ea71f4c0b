"""The download cache's index: which objects of a bucket/prefix are on disk, by ETag and size.

One SQLite file per bucket/prefix under ``<cache>/index/``. It stays cheap at millions of
keys: a fetch reads it once, in key order, and merges it with the bucket listing (also in key
order, as S3 guarantees) in one pass and constant memory; it writes only what changed.

Rows are added only after a file is complete and in place, so a partial download never looks
complete. A row also holds the file's mtime: a file replaced or touched since (a download
cut off before its row was updated, a hand edit) no longer matches it, and is fetched again.
Downloads of the fetch in progress go to a ``done`` journal and join ``objects`` at the end,
so that the merge never reads rows that change under it. A fetch marks the index
dirty while it runs: after a killed fetch, the next one sweeps the folder once for files the
index does not vouch for (temporaries, files renamed in place but not yet recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

Row = tuple[str, str, int]  # a listed object: key relative to the prefix, ETag, size
Entry = tuple[str, str, int, int]  # an indexed file: key, ETag, size, mtime (ns)
Held = tuple[str, int, int]  # what the index holds for a key: ETag, size, mtime
PAGE = 5000  # index rows read per query
VERSION = 1  # of the schema; an index of another version is rebuilt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, etag TEXT NOT NULL,
    size INTEGER NOT NULL, mtime INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS done (key TEXT PRIMARY KEY, etag TEXT NOT NULL,
    size INTEGER NOT NULL, mtime INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class OutOfOrder(Exception):
    """The listing was not in key order, so the one-pass merge cannot be trusted."""


class CacheIndex:
    """The index of the files under ``root`` (one bucket/prefix's mirror), kept in ``path``.
    Use as a context manager, from one thread."""

    def __init__(self, path: Path, root: Path) -> None:
        self.root = root
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rollback journal, not WAL: WAL needs shared memory, which network volumes lack.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=60)
        if self.db.execute("PRAGMA user_version").fetchone()[0] != VERSION:
            self.db.executescript("DROP TABLE IF EXISTS objects; DROP TABLE IF EXISTS done;"
                                  "DROP TABLE IF EXISTS meta;" + _SCHEMA +
                                  f"PRAGMA user_version = {VERSION};")
            # Files may lie in the folder from an index that was lost: sweep them first.
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('dirty', '1')")
            self._import_legacy(path.with_suffix(".json"))

    @classmethod
    def for_prefix(cls, cache_dir: Path, bucket: str, base: str) -> CacheIndex:
        """The index of the mirror of s3://bucket/base, at cache_dir/s3/bucket/base."""
        name = hashlib.sha1(f"{bucket}/{base}".encode()).hexdigest()
        return cls(cache_dir / "index" / f"{name}.sqlite", cache_dir / "s3" / bucket / base)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def rows(self) -> Iterator[Entry]:
        """Every row, in key order; a page per query, so no statement stays open."""
        last = None
        while True:
            if last is None:
                page = self.db.execute("SELECT key, etag, size, mtime FROM objects "
                                       "ORDER BY key LIMIT ?", (PAGE,)).fetchall()
            else:
                page = self.db.execute("SELECT key, etag, size, mtime FROM objects "
                                       "WHERE key > ? ORDER BY key LIMIT ?",
                                       (last, PAGE)).fetchall()
            yield from page
            if len(page) < PAGE:
                return
            last = page[-1][0]

    def lookup(self, key: str) -> Held | None:
        row = self.db.execute("SELECT etag, size, mtime FROM objects WHERE key = ?",
                              (key,)).fetchone()
        return tuple(row) if row else None

    def record(self, entries: list[Entry]) -> None:
        """Journal downloads that are complete and in place; durable on return."""
        if entries:
            with self._transaction():
                self.db.executemany("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?)", entries)

    def forget(self, keys: Iterable[str]) -> None:
        with self._transaction():
            self.db.executemany("DELETE FROM objects WHERE key = ?", ((k,) for k in keys))

    def settle(self) -> None:
        """Move the journal into ``objects``."""
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO objects SELECT * FROM done")
            self.db.execute("DELETE FROM done")

    def start_sync(self) -> bool:
        """Mark a sync of the whole folder as running; True if the previous one never
        finished (the caller then sweeps the folder)."""
        self.settle()  # downloads a killed fetch completed are real: keep them
        was = self.dirty()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('dirty', '1')")
        return was

    def dirty(self) -> bool:
        """Whether a sync of the folder started and never finished."""
        row = self.db.execute("SELECT value FROM meta WHERE name = 'dirty'").fetchone()
        return bool(row and row[0] == "1")

    def finish_sync(self) -> None:
        self.settle()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('dirty', '0')")

    def sweep(self) -> int:
        """Delete files in the folder that the index does not vouch for; returns the count."""
        removed, top = 0, str(self.root)
        for folder, _, files in os.walk(top):
            prefix = folder[len(top) + 1:].replace(os.sep, "/")
            for name in files:
                held = self.lookup(f"{prefix}/{name}" if prefix else name)
                path = os.path.join(folder, name)
                if held is None or not intact(path, held[1], held[2]):
                    os.unlink(path)
                    removed += 1
        if removed:
            log.info("removed %d unrecorded files left by an interrupted download", removed)
        return removed

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _import_legacy(self, legacy: Path) -> None:
        # The JSON index of earlier versions, {key: [etag, size]}, written only after complete
        # downloads: importing it spares a full download after an upgrade. Each file is taken
        # as it is now (its mtime), if its size still matches.
        if not legacy.exists():
            return
        with contextlib.suppress(ValueError, OSError, TypeError):
            entries = []
            for key, (etag, size) in json.loads(legacy.read_text()).items():
                with contextlib.suppress(OSError):
                    st = os.stat(self.root / key)
                    if st.st_size == size:
                        entries.append((key, str(etag), int(size), st.st_mtime_ns))
            self.record(entries)
            self.settle()
        legacy.unlink(missing_ok=True)


def intact(path: str | Path, size: int, mtime: int) -> bool:
    """The file is there, as it was when recorded."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime


def merge(listed: Iterable[Row], indexed: Iterable[Entry],
          gone: list[str]) -> Iterator[tuple[Row, Held | None]]:
    """One pass over two key-sorted streams: yield each listed row with what the index holds
    for its key (or None), and append to ``gone`` the indexed keys no longer listed.

    Raises OutOfOrder if ``listed`` is not strictly increasing (S3 promises UTF-8 binary
    order, which is Python's str order; a server that breaks it gets the slow path).
    """
    index_iter = iter(indexed)
    ahead = next(index_iter, None)
    previous = None
    for row in listed:
        key = row[0]
        if previous is not None and key <= previous:
            raise OutOfOrder(f"{key!r} listed after {previous!r}")
        previous = key
        while ahead is not None and ahead[0] < key:
            gone.append(ahead[0])
            ahead = next(index_iter, None)
        if ahead is not None and ahead[0] == key:
            yield row, ahead[1:]
            ahead = next(index_iter, None)
        else:
            yield row, None
    while ahead is not None:
        gone.append(ahead[0])
        ahead = next(index_iter, None)
