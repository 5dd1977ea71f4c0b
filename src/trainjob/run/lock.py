"""The run lock: one job owns an output folder at a time, and a job that lost it stops.

``run.lock.json`` holds the owner's token, host, pid, owner id, start time and heartbeat.
Every change to it is a compare-and-swap (``Store.put_if_absent`` / ``put_if_match`` /
``delete_if_match``): acquiring creates it only where none exists, heartbeats, take-overs
and the release change it only while it is the version this job last wrote. Two jobs that
start at the same instant cannot both get it, and a job whose lock was taken over learns so
at its next heartbeat (a 412): ``lost`` is set and ``check()`` raises LostOwnership (exit 6),
so it stops writing (fencing).

A heartbeat that fails (the store unreachable, the process paused) proves nothing either
way, so a job holds a *lease*: it writes to the run only while its last successful beat is
younger than LEASE_FRACTION of the stale time (``ensure_lease`` confirms it with a beat
when it is older), and it confirms the lock with a conditional write right before the
writes that decide what the run is (the resume records, ``status.json``, the manifest) and
before any delete (``confirm``). Another job takes the lock over only once the last beat is
older than the whole stale time, so a write started inside the lease cannot meet one of
the new owner's.

A job that meets a live lock waits (``--lock-timeout``, default: until the heartbeat is
stale) and then takes over; it takes over at once with ``--force``, from a dead pid on the
same host, or from a previous pod of the same ``TRAINJOB_OWNER_ID``.

Stores that ignore conditional writes are found by a probe once per run; there the lock
falls back to read-then-write, which is advisory, with one warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from trainjob.errors import ConditionalWritesUnsupported, ConfigError, LostOwnership, StorageError
from trainjob.hooks import read_hooks
from trainjob.run.folder import LOCK
from trainjob.store.base import Store
from trainjob.store.hostcache import pid_alive

log = logging.getLogger(__name__)

STALE_SECONDS = 600.0
HEARTBEAT_SECONDS = 60.0
LEASE_FRACTION = 0.5  # of the stale time: the lease a successful beat gives the writes
# Of the stale time after the last successful beat: a write still running then is cancelled
# (the rest is margin for the store applying it and for clocks).
LANDING_FRACTION = 0.9
POLL_SECONDS = 5.0
PROBE_PREFIX = ".run.lock.probe-"  # a dot name: never published, never in the manifest
NO_SUCH_ETAG = '"00000000000000000000000000000000"'


def _now() -> float:
    return time.time()


class RunLock:
    def __init__(self, store: Store, *, stale_after: float | None = None,
                 heartbeat_every: float | None = None) -> None:
        hooks = read_hooks()  # tests shorten the timings of a job they start this way
        self.store = store
        self.stale_after = float(stale_after if stale_after is not None else
                                 hooks.get("lock_stale_seconds", STALE_SECONDS))
        self.heartbeat_every = float(heartbeat_every if heartbeat_every is not None else
                                     hooks.get("lock_heartbeat_seconds", HEARTBEAT_SECONDS))
        self.token = uuid.uuid4().hex
        self.started = _now()
        self.lost = threading.Event()  # set, from any thread, once another job holds the lock
        self.taken_by: dict = {}  # the record that replaced ours ({} if the lock was removed)
        self.conditional: bool | None = None  # None until probed
        self._etag: str | None = None  # of the version we last wrote (conditional mode)
        self._held = False
        self._confirmed = 0.0  # time.monotonic() of the last write that proved the lock ours
        self._mutex = threading.Lock()  # one change of the lock at a time: beats vs release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking the lock --------------------------------------------------------------------

    def acquire(self, *, force: bool = False, timeout: float | None = None,
                poll: float = POLL_SECONDS) -> None:
        """Take the lock, waiting for a live holder as the options say."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.probe()
        while True:
            current = self.store.read_versioned(LOCK)
            held = _parse(current)
            reason = self._takeover_reason(held, force)
            if reason:
                if self._claim(current):
                    if held:
                        log.warning("taking over the run lock from %s pid %s (%s)",
                                    held.get("host"), held.get("pid"), reason)
                    break
                # Another job changed the lock between our read and our write: look again.
                log.info("the run lock changed while being taken; reading it again")
                continue
            if deadline is not None and time.monotonic() >= deadline:
                age = _now() - float(held.get("heartbeat", 0))
                raise ConfigError(
                    f"{self.store.child(LOCK)} is held by {held.get('host')} pid "
                    f"{held.get('pid')} (heartbeat {age:.0f}s ago): another job is writing this "
                    "run; wait for it, use another --output, or pass --force to take over")
            log.info("run lock held by %s pid %s; waiting", held.get("host"), held.get("pid"))
            time.sleep(poll)
        self._held = True
        self._confirmed = time.monotonic()
        self._stop.clear()  # a lock taken again after release() beats again
        self._thread = threading.Thread(target=self._beat, name="trainjob-lock", daemon=True)
        self._thread.start()

    def probe(self) -> bool:
        """Find out, once, whether the store honours conditional writes; warn if it does not."""
        if self.conditional is None:
            self.conditional = supports_conditional_writes(self.store,
                                                           PROBE_PREFIX + self.token)
            if not self.conditional:
                log.warning("%s does not honour conditional writes (If-None-Match/If-Match): "
                            "the run lock is advisory there, and two jobs started at the same "
                            "moment could both write this run", self.store.uri)
        return self.conditional

    def _claim(self, current: tuple[bytes, str] | None) -> bool:
        """Write our record over ``current`` (the version we read); False if we lost a race."""
        data = self._record_bytes()
        if not self.conditional:
            self.store.write_bytes(LOCK, data)
            return True
        if current is None:
            etag = self.store.put_if_absent(LOCK, data)
        else:
            etag = self.store.put_if_match(LOCK, data, current[1])
        self._etag = etag or self._our_etag()
        return self._etag is not None

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

    # --- keeping it -------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Refresh the heartbeat: one conditional PUT. If another job has taken the lock,
        set ``lost`` and beat no more. A storage failure is logged, never fatal: an outage
        shows up in the uploads, and training should not die of a missed beat."""
        with self._mutex:
            if not self._held:
                return
            try:
                if self.conditional:
                    self._beat_conditional()
                else:
                    self._beat_advisory()
            except StorageError as exc:
                log.warning("lock heartbeat failed: %s", exc)

    def confirm(self) -> None:
        """Prove now that the lock is still ours, with one conditional write (a beat): call
        it right before a write that decides what the run is, and before any delete.
        Raises LostOwnership if another job holds it, StorageError if the store cannot
        tell (the caller retries; it must not write meanwhile)."""
        with self._mutex:
            self.check()
            if not self._held:
                raise LostOwnership(f"{self.store.child(LOCK)} is not held by this job: "
                                    "nothing more may be written to the run")
            if self.conditional:
                self._beat_conditional()
            else:
                self._beat_advisory()
        self.check()

    def write_deadline(self) -> float:
        """When a write must have landed (time.monotonic's clock): until then no other job
        can have taken the lock over. Moves later with every successful beat."""
        return self._confirmed + self.stale_after * LANDING_FRACTION

    def ensure_lease(self) -> None:
        """Raise unless the lease is live: call before every write to the run. Cheap while
        the last beat is recent; past LEASE_FRACTION of the stale time it confirms first."""
        self.check()
        if time.monotonic() - self._confirmed > self.stale_after * LEASE_FRACTION:
            log.info("the last heartbeat is %.0fs old: confirming the run lock before writing",
                     time.monotonic() - self._confirmed)
            self.confirm()

    def _beat_conditional(self) -> None:
        began = time.monotonic()  # the record's heartbeat is taken now: the lease counts from it
        etag = self.store.put_if_match(LOCK, self._record_bytes(), self._etag)
        if etag is None:
            # Only on a 412: find out who holds it now (the common path stays one PUT).
            current = self.store.read_versioned(LOCK)
            held = _parse(current)
            if held and held.get("token") == self.token:
                # Our own previous beat landed but its reply was lost (and a retry got 412).
                etag = current[1]
            else:
                self._lose(held)
                return
        self._etag = etag
        self._confirmed = began

    def _beat_advisory(self) -> None:
        began = time.monotonic()
        held = self.store.read_json(LOCK)
        if held and held.get("token") != self.token:
            self._lose(held)
            return
        self.store.write_bytes(LOCK, self._record_bytes())
        self._confirmed = began

    def _lose(self, held: dict | None) -> None:
        self.taken_by = held or {}
        self._held = False
        self._stop.set()  # no more beats: the lock is not ours to refresh
        self.lost.set()
        log.error("%s", self._loss_message())

    def check(self) -> None:
        """Raise LostOwnership once this job knows another has taken the lock over (cheap:
        a flag, checked at every batch end). Writes go through ``ensure_lease``."""
        if self.lost.is_set():
            raise LostOwnership(self._loss_message())

    def _loss_message(self) -> str:
        held = self.taken_by
        what = (f"it was taken over by {held.get('host')} pid {held.get('pid')}" if held else
                "it was removed or replaced by another writer")
        return (f"lost the run lock {self.store.child(LOCK)}: {what}, so this job stopped "
                "writing the run; let the other job finish, or stop it and rerun this one "
                "with --force")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            self.heartbeat()

    # --- giving it back ---------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a beat in flight lands before the delete, not after
        with self._mutex:
            if not self._held:
                return
            self._held = False
            try:
                if self.conditional:
                    self._delete_conditional()
                else:
                    held = self.store.read_json(LOCK)
                    if held and held.get("token") == self.token:
                        self.store.delete([LOCK])
            except StorageError as exc:  # it goes stale by itself; the job's error matters more
                log.warning("could not release the run lock: %s", exc)

    def _delete_conditional(self) -> None:
        if self.store.delete_if_match(LOCK, self._etag):
            return
        etag = self._our_etag()  # a beat whose reply was lost leaves us a stale ETag
        if etag is not None:
            self.store.delete_if_match(LOCK, etag)

    # --- helpers ----------------------------------------------------------------------------

    def _record_bytes(self) -> bytes:
        record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                  "owner": os.environ.get("TRAINJOB_OWNER_ID", ""), "started": self.started,
                  "heartbeat": _now()}
        return json.dumps(record, indent=2, sort_keys=True).encode()

    def _our_etag(self) -> str | None:
        """The lock's ETag if it holds our token: only we write our token, so such a
        version is one of our own writes (say, one retried after its reply was lost)."""
        current = self.store.read_versioned(LOCK)
        held = _parse(current)
        return current[1] if held and held.get("token") == self.token else None


def supports_conditional_writes(store: Store, key: str) -> bool:
    """Probe ``store`` with a scratch object: a second create-if-absent, a replace and a
    delete over a wrong ETag must be refused (servers that ignore the headers accept them);
    a replace over the ETag a GET reports, and a delete over the one a PUT returned, must be
    accepted. The scratch object is removed either way."""
    try:
        if not _landed(store, key, store.put_if_absent(key, b"probe"), b"probe"):
            return False
        if (store.put_if_absent(key, b"probe again") is not None
                or store.put_if_match(key, b"probe wrong", NO_SUCH_ETAG) is not None
                or store.delete_if_match(key, NO_SUCH_ETAG)):
            return False
        current = store.read_versioned(key)
        etag = current and store.put_if_match(key, b"probe over", current[1])
        if not _landed(store, key, etag, b"probe over"):
            return False
        etag = etag or store.read_versioned(key)[1]
        return store.delete_if_match(key, etag) or store.read_versioned(key) is None
    except ConditionalWritesUnsupported as exc:
        log.info("%s", exc)
        return False
    finally:
        try:
            store.delete([key])
        except StorageError as exc:  # a stray dot file is harmless; the probe's answer stands
            log.warning("could not remove the lock probe: %s", exc)


def _landed(store: Store, key: str, etag: str | None, data: bytes) -> bool:
    """Whether a write of ``data`` to ``key`` took effect: it returned an ETag, or its reply
    was lost and the retry refused (412), yet the object holds what we wrote."""
    if etag is not None:
        return True
    current = store.read_versioned(key)
    return current is not None and current[0] == data


def _parse(current: tuple[bytes, str] | None) -> dict | None:
    """The lock record, or None when there is none; an unreadable one counts as none (it
    is still replaced with a compare-and-swap on its ETag)."""
    if current is None:
        return None
    try:
        record = json.loads(current[0])
    except ValueError:
        log.warning("ignoring an unreadable run lock")
        return None
    return record if isinstance(record, dict) else None

