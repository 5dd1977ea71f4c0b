"""The run lock: one job owns an output folder at a time.

The lock object holds host, pid, start time and a heartbeat. A job that meets a live lock
waits (``--lock-timeout``, default: until the heartbeat is stale) and then takes over, so a
restarted pod whose predecessor died carries on instead of failing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from trainjob.artifacts import LOCK
from trainjob.errors import ConfigError, StorageError
from trainjob.storage import Store

log = logging.getLogger(__name__)

STALE_SECONDS = 600.0
HEARTBEAT_SECONDS = 60.0
POLL_SECONDS = 5.0


def _now() -> float:
    return time.time()


class RunLock:
    def __init__(self, store: Store, *, stale_after: float = STALE_SECONDS) -> None:
        self.store = store
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self.started = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "owner": os.environ.get("TRAINJOB_OWNER_ID", ""), "started": self.started,
                "heartbeat": _now()}

    def acquire(self, *, force: bool = False, timeout: float | None = None,
                poll: float = POLL_SECONDS) -> None:
        """Take the lock, waiting for a live holder as the options say."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            held = self.store.read_json(LOCK)
            reason = self._takeover_reason(held, force)
            if reason:
                if held:
                    log.warning("taking over the run lock from %s pid %s (%s)",
                                held.get("host"), held.get("pid"), reason)
                break
            if deadline is not None and time.monotonic() >= deadline:
                age = _now() - float(held.get("heartbeat", 0))
                raise ConfigError(
                    f"{self.store.child(LOCK)} is held by {held.get('host')} pid "
                    f"{held.get('pid')} (heartbeat {age:.0f}s ago): another job is writing this "
                    "run; wait for it, use another --output, or pass --force to take over")
            log.info("run lock held by %s pid %s; waiting", held.get("host"), held.get("pid"))
            time.sleep(poll)
        self.store.write_json(LOCK, self._record())
        self._thread = threading.Thread(target=self._beat, name="trainjob-lock", daemon=True)
        self._thread.start()

    def _takeover_reason(self, held: dict | None, force: bool) -> str:
        if not held:
            return "free"
        if force:
            return "--force"
        age = _now() - float(held.get("heartbeat", 0))
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f}s"
        if held.get("host") == socket.gethostname() and not pid_alive(int(held.get("pid", 0))):
            return "its process is gone"
        owner = os.environ.get("TRAINJOB_OWNER_ID")
        if owner and held.get("owner") == owner:
            # Same Kubernetes Job: it starts a new pod only after the old one ended.
            return "same owner id, previous pod ended"
        return ""

    def heartbeat(self) -> None:
        """Refresh the heartbeat. A failed beat is logged, never fatal: a storage outage
        shows up in the uploads, and training should not die of a missed beat."""
        try:
            held = self.store.read_json(LOCK)
            if held and held.get("token") != self.token:
                log.warning("run lock was taken over by %s pid %s",
                            held.get("host"), held.get("pid"))
                return
            self.store.write_json(LOCK, self._record())
        except StorageError as exc:
            log.warning("lock heartbeat failed: %s", exc)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.heartbeat()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a beat in flight lands before the delete, not after
        try:
            held = self.store.read_json(LOCK)
            if held and held.get("token") == self.token:
                self.store.delete([LOCK])
        except StorageError as exc:  # it goes stale by itself; the job's own error matters more
            log.warning("could not release the run lock: %s", exc)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
