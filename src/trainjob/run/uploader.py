"""The background uploader: mirrors the run folder to the output store in generations.

A generation is the set of files one save point changed (an epoch end, a mid-epoch resume
point, a status change), in the order the bucket must see them: resume weights before the
state that names them, status last. The uploader always finishes the generation it started.
When training makes generations faster than they upload (a GPU epoch takes seconds, its
resume state is hundreds of MB), the generations waiting meanwhile are merged into the
newest: superseded resume pairs are dropped, other changed files ride along. So the bucket
lags by at most about one generation's upload time, and it always describes one epoch.

A failed upload is retried, with backoff, until it succeeds: an outage early in a two-day
run costs nothing once the store is back. Only ``flush(timeout)``, at the moments where
something must be final, turns an upload still failing into a ``StorageError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from trainjob.errors import StorageError
from trainjob.store.base import Store

log = logging.getLogger(__name__)

UPLOAD_NICE = 10
MAX_BACKOFF = 30.0
FLUSH_SLICE = 0.25  # seconds a flush waits before it looks again
# Files trainjob itself only ever replaces whole (write, then rename): a snapshot may be a
# hard link instead of a copy. Keras rewrites its own files in place, so those are copied.
REPLACED_WHOLE = ("backup/", ".json")

Action = Callable[[], None]


@dataclass
class Snapshot:
    path: Path  # a private copy (or hard link) in the staging folder
    size: int


@dataclass
class Generation:
    seq: int
    label: str
    files: dict[str, Snapshot] = field(default_factory=dict)  # upload order
    transient: set[str] = field(default_factory=set)  # superseded by the next generation
    after: list[Action] = field(default_factory=list)  # once every file is stored
    merged: int = 0  # generations folded into this one


def _snapshot(path: Path, snap: Path, replaced_whole: bool) -> None:
    if replaced_whole:
        try:
            os.link(path, snap)  # free: the writer's next version is a new inode
            return
        except OSError:
            pass
    shutil.copyfile(path, snap)


class Uploader:
    """One background thread that sends generations of run-folder files to the store."""

    def __init__(self, store: Store, root: Path, *, enabled: bool = True,
                 backoff: float = 1.0, fence: Callable[[], None] | None = None,
                 confirm: Callable[[], None] | None = None,
                 critical: Callable[[str], bool] = lambda rel: False,
                 deadline: Callable[[], float] | None = None,
                 order: Callable[[str], int] = lambda rel: 0) -> None:
        self.store, self.root, self.enabled = store, root, enabled
        self.backoff = backoff
        self.order = order  # files of a generation go up sorted by it (stable)
        # Before every put: raises once the run may not be written (another job owns it);
        # a StorageError means "cannot tell now" and the put waits and retries.
        self.fence = fence or (lambda: None)
        # Before the puts that decide what the run is (``critical``): a stronger check, such
        # as a conditional write of the run lock. (An action that deletes confirms itself.)
        self.confirm = confirm or self.fence
        self.critical = critical
        # When a put must have landed (the run lock's lease): one still running is cancelled.
        self.deadline = deadline
        self.lost: Exception | None = None  # what the fence raised: nothing is sent after it
        self.staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        self._stamps: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) last committed
        self._pending: Generation | None = None
        self._current: Generation | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._seq = 0
        self.stored_label = ""  # the newest generation wholly in the store
        self.error: StorageError | None = None  # the last failure; cleared by a success
        self.uploads = 0
        self.bytes_sent = 0  # of the files stored by this uploader
        self.skipped = 0
        self.sending: str | None = None  # the file being put (or retried) now, if any
        self._thread = threading.Thread(target=self._run, name="trainjob-uploader", daemon=True)
        self._thread.start()

    # --- the training side ------------------------------------------------------------

    def commit(self, rels: Iterable[str], *, label: str = "", transient: Iterable[str] = (),
               after: Iterable[Action] = (), force: bool = False) -> None:
        """Queue one generation: the files among ``rels`` that changed, in that order.

        ``transient`` files are dropped if a newer generation supersedes this one before it
        is sent (the resume pair); ``after`` runs once the whole generation is stored.
        Never waits for the network: at most one generation waits while one is sent.
        """
        if not self.enabled or self._closed:
            return
        with self._cond:
            self._seq += 1
            gen = Generation(self._seq, label or f"#{self._seq}", transient=set(transient),
                             after=list(after))
            for rel in rels:
                self._add(gen, rel, force)
            if not gen.files and not gen.after:
                return
            if self._pending is not None:
                gen = _merge(self._pending, gen)
            gen.files = dict(sorted(gen.files.items(), key=lambda kv: self.order(kv[0])))
            self._pending = gen
            self._cond.notify_all()

    def submit(self, *rels: str, force: bool = False) -> None:
        """Queue these files as a generation of their own."""
        self.commit(rels, force=force)

    def _add(self, gen: Generation, rel: str, force: bool) -> None:
        path = self.root / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_size, st.st_mtime_ns)
        if not force and self._stamps.get(rel) == stamp:
            return  # unchanged since it was last queued: no second upload of the same bytes
        snap = self.staging / f"{gen.seq}-{len(gen.files)}-{path.name}"
        _snapshot(path, snap, rel.startswith(REPLACED_WHOLE[0]) or rel.endswith(REPLACED_WHOLE[1]))
        gen.files[rel] = Snapshot(snap, st.st_size)
        self._stamps[rel] = stamp

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is stored. At the deadline, an upload that is still
        failing raises its ``StorageError``; without a failure, returns False. Once the run
        is another job's, raises what the fence raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        idle = lambda: self._pending is None and self._current is None  # noqa: E731
        with self._cond:
            # In short waits: a signal handler runs in this (main) thread only between them.
            while not (idle() or self._closed):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(FLUSH_SLICE if left is None else min(FLUSH_SLICE, left))
            done = idle()
            if self.lost is not None:
                raise self.lost
            if not done and self.error is not None:
                raise self.error
        return bool(done)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop sending (what is unsent stays unsent) and remove the snapshots. Returns
        False if a put was still in flight at the timeout (it ends on its own, and nothing
        is sent after it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, timeout))
        shutil.rmtree(self.staging, ignore_errors=True)
        return not self._thread.is_alive()

    # --- the uploader thread ------------------------------------------------------------

    def _run(self) -> None:
        # Below the trainer's threads: uploads fill idle CPU time instead of taking it from
        # training. Linux applies nice per thread; boto3's transfer threads inherit it.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           max(os.getpriority(os.PRIO_PROCESS, 0), UPLOAD_NICE))
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                gen, self._pending, self._current = self._pending, None, self._pending
            if gen.merged:
                self.skipped += gen.merged
                log.info("upload: skipped %d generation(s) to catch up; sending %s",
                         gen.merged, gen.label)
            try:
                if self._send(gen):
                    for action in gen.after:
                        self._act(action)
                    self.stored_label = gen.label
            finally:
                for snap in gen.files.values():
                    snap.path.unlink(missing_ok=True)
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _send(self, gen: Generation) -> bool:
        """Every file of the generation, in order; False if stopped before the end."""
        for rel, snap in gen.files.items():
            attempt = 0
            while True:
                if self._closed:
                    return False
                self.sending = rel
                try:
                    if not self._ours(self.confirm if self.critical(rel) else self.fence):
                        return False
                    if self.deadline is None:
                        self.store.put(snap.path, rel)
                    else:
                        self.store.put(snap.path, rel, until=self.deadline)
                    break
                except StorageError as exc:
                    self.error = exc
                    delay = min(MAX_BACKOFF, self.backoff * 2**attempt)
                    attempt += 1
                    log.warning("upload of %s failed (%s); retrying in %.1fs", rel, exc, delay)
                    with self._cond:
                        self._cond.wait_for(lambda: self._closed, delay)
                except Exception as exc:  # noqa: BLE001 - a dead thread would hang flush()
                    self.error = StorageError(f"upload of {rel} to {self.store.uri} failed: {exc}")
                    log.error("%s", self.error)
                    with self._cond:
                        self._cond.wait_for(lambda: self._closed, MAX_BACKOFF)
                finally:
                    self.sending = None
            with self._cond:
                self.uploads += 1
                self.bytes_sent += snap.size
                self.error = None
        return True

    def _ours(self, check: Callable[[], None]) -> bool:
        """Whether this job may still write the run; once not, it never writes there again.
        A check that cannot reach the store raises its StorageError (the caller retries)."""
        if self.lost is None:
            try:
                check()
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever else the fence raises ends uploads
                log.error("uploads stopped: %s", exc)
                self.lost = exc
        return self.lost is None

    def _act(self, action: Action) -> None:
        """An action of a stored generation; one that deletes confirms the lock itself."""
        if self.lost is not None:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - housekeeping never fails the run
            log.warning("after upload: %s", exc)


def _merge(older: Generation, newer: Generation) -> Generation:
    """Fold a generation that was never started into the next one. The older one's
    transient files (its resume pair) are dropped when the newer one brings its own;
    every other file rides along unless the newer one has a newer copy. Its ``after``
    actions are dropped with its pair: the newer generation's cover them."""
    superseded = older.transient if newer.transient else set()
    for rel, snap in older.files.items():
        if rel in newer.files or rel in superseded:
            snap.path.unlink(missing_ok=True)
        else:
            newer.files[rel] = snap
            newer.transient |= {rel} & older.transient
    if not newer.transient:
        newer.after = older.after + newer.after
    newer.merged += older.merged + 1
    return newer
