"""Host-local cache coordination: jobs on one host share the download cache, the extraction
folders, ``cache/converted`` and tf.data file caches, and file locks (``flock``) keep one
job from deleting or rewriting a folder another live job is building or reading.

One lock file per cache folder (``<parent>/.locks/<name>.lock`` unless the owner says
otherwise), three ways to hold it:

- SHARED while a job uses the folder. Inside ``session()``, the job's run, it is kept until
  the run ends; without a session (tests, ``trainjob dataset``) only while the step runs.
- EXCLUSIVE while a job builds or rewrites the folder (``ensure``).
- EXCLUSIVE, NON-BLOCKING to prune: a folder some live job holds is skipped (``prune``).

The kernel drops a dead process's locks, so a killed job never leaves a folder locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

log = logging.getLogger(__name__)



class _Session(contextlib.ExitStack):
    """The locks a job keeps for its run, and which lock files they are."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[Path] = set()


_session: ContextVar[_Session | None] = ContextVar("trainjob_cache_session", default=None)


def lock_file_for(folder: Path) -> Path:
    """Where ``folder``'s lock lives: beside it, never inside it, so it outlives a rebuild."""
    return folder.parent / ".locks" / f"{folder.name}.lock"


class FolderLock:
    """An flock on one lock file; ``with`` releases it."""

    def __init__(self, lock_file: Path) -> None:
        self.path = lock_file
        self.fd: int | None = None

    def acquire(self, *, exclusive: bool, wait: bool = True) -> bool:
        """Take the lock; with ``wait=False`` return False at once when another holds it."""
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, mode)
                # A pruner unlinks the lock file of a folder it removed, while holding it:
                # a lock on that old file guards nothing, so lock the file that is there now.
                current = os.stat(self.path).st_ino
            except BlockingIOError:
                os.close(fd)
                return False
            except FileNotFoundError:
                current = None
            except BaseException:
                os.close(fd)
                raise
            if current == os.fstat(fd).st_ino:
                self.fd = fd
                return True
            os.close(fd)

    def share(self) -> None:
        """Exclusive -> shared. Linux converts it under one spinlock: no pruner gets between."""
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def session() -> Iterator[contextlib.ExitStack]:
    """The job's run: every cache folder a step uses stays locked (shared) until it ends."""
    with _Session() as stack:
        token = _session.set(stack)
        try:
            yield stack
        finally:
            _session.reset(token)


def keep(lock: FolderLock) -> None:
    """Hold ``lock`` until the session ends; with no session there is no run to hold it for."""
    stack = _session.get()
    if stack is None:
        lock.release()
    else:
        stack.held.add(lock.path)
        stack.callback(lock.release)


@contextlib.contextmanager
def using(folder: Path, *, tidy: Callable[[], None] | None = None,
          lock_file: Path | None = None) -> Iterator[FolderLock]:
    """Hold ``folder`` shared while the block runs, and for the session after it.

    After the block, if no other job on this host uses the folder, ``tidy()`` runs under an
    exclusive lock. The lock is let go for a moment first: ``tidy`` must spare what the
    block just used (e.g. by its mtime), since another job's tidy may run in that moment.
    """
    lock = FolderLock(lock_file or lock_file_for(folder))
    lock.acquire(exclusive=False)
    try:
        yield lock
        if tidy:
            lock.release()
            if lock.acquire(exclusive=True, wait=False):
                tidy()
                lock.share()
            else:
                lock.acquire(exclusive=False)
    except BaseException:
        lock.release()
        raise
    keep(lock)


def ensure(folder: Path, *, ready: Callable[[], bool], build: Callable[[], None],
           lock_file: Path | None = None, hold: bool = True) -> bool:
    """Make ``folder`` ready, building it under an exclusive lock only when ``ready()`` says
    it is not; then hold it shared (``hold``, see ``keep``). Returns whether it was built."""
    lock = FolderLock(lock_file or lock_file_for(folder))
    built = False
    try:
        lock.acquire(exclusive=False)  # waits while another job builds it
        if not ready():
            lock.release()
            if not lock.acquire(exclusive=True, wait=False):
                stack = _session.get()
                if stack is not None and lock.path in stack.held:  # would wait for itself
                    raise RuntimeError(f"{folder} must be rebuilt but this job holds it")
                log.warning("%s is in use by another job on this host; waiting for it before "
                            "updating the folder", folder)
                lock.acquire(exclusive=True)
            if not ready():  # another job may have built it while this one waited
                build()
                built = True
            lock.share()
    except BaseException:
        lock.release()
        raise
    if hold:
        keep(lock)
    else:
        lock.release()
    return built


def prune(paths: Iterable[Path], *, lock_file: Callable[[Path], Path] = lock_file_for
          ) -> list[Path]:
    """Remove each folder or file that no live job on this host holds; keep the busy ones."""
    removed = []
    for path in paths:
        lock = FolderLock(lock_file(path))
        if not lock.acquire(exclusive=True, wait=False):
            log.info("keeping %s: another job on this host is using it", path)
            continue
        with lock:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            lock.path.unlink(missing_ok=True)  # still held: see FolderLock.acquire
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts: it exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
