"""trainjob.run.lock: one job per run folder, on the local disk and on real S3 servers (moto,
SeaweedFS). Real processes racing and fencing each other: test_lock_processes.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from trainjob.errors import NON_RETRIABLE, ConfigError, LostOwnership
from trainjob.run.folder import LOCK
from trainjob.run.lock import HEARTBEAT_SECONDS, PROBE_PREFIX, STALE_SECONDS, RunLock
from trainjob.store.local import LocalStore


@pytest.fixture
def locks():
    """RunLocks made by a test; all released at the end so no heartbeat thread lingers."""
    made: list[RunLock] = []

    def make(store, **kwargs) -> RunLock:
        lock = RunLock(store, **kwargs)
        made.append(lock)
        return lock

    yield make
    for lock in made:
        lock._stop.set()


def holder(**fields) -> dict:
    record = {"token": "someone-else", "host": "other-host-7", "pid": 4242, "owner": "",
              "started": time.time() - 100, "heartbeat": time.time()}
    record.update(fields)
    return record


@pytest.fixture
def live_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def ours(store, lock: RunLock) -> bool:
    held = store.read_json(LOCK)
    return bool(held) and held["token"] == lock.token


def test_free_lock_is_acquired(store, locks):
    lock = locks(store)
    started = time.monotonic()
    lock.acquire(timeout=5, poll=0.05)
    assert time.monotonic() - started < 2
    held = store.read_json(LOCK)
    assert held["token"] == lock.token
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    assert abs(held["heartbeat"] - time.time()) < 30
    lock.release()
    assert store.read_json(LOCK) is None


@pytest.mark.parametrize("who", ["other-host", "live-pid-here"])
def test_live_lock_waits_then_fails(store, locks, who, live_child):
    record = holder() if who == "other-host" else holder(host=socket.gethostname(),
                                                         pid=live_child)
    store.write_json(LOCK, record)
    lock = locks(store)
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        lock.acquire(timeout=0.6, poll=0.1)
    waited = time.monotonic() - started
    assert 0.6 <= waited < 5
    assert err.value.exit_code == 2
    message = str(err.value)
    assert "\n" not in message and "--force" in message and str(record["pid"]) in message
    assert store.read_json(LOCK) == record  # untouched


def test_live_lock_released_while_waiting_is_taken(store, locks):
    store.write_json(LOCK, holder())
    lock = locks(store)
    threading.Timer(0.3, lambda: store.delete([LOCK])).start()
    lock.acquire(timeout=5, poll=0.05)
    assert ours(store, lock)


def test_stale_lock_is_taken_over(store, locks):
    store.write_json(LOCK, holder(heartbeat=time.time() - 700))
    lock = locks(store)  # default staleness: 600 s
    started = time.monotonic()
    lock.acquire(timeout=5, poll=0.05)
    assert time.monotonic() - started < 2
    assert ours(store, lock)


def test_staleness_is_configurable(store, locks):
    store.write_json(LOCK, holder(heartbeat=time.time() - 3))
    lock = locks(store, stale_after=1.0)
    lock.acquire(timeout=5, poll=0.05)
    assert ours(store, lock)


def test_force_takes_over_at_once(store, locks):
    store.write_json(LOCK, holder())
    lock = locks(store)
    started = time.monotonic()
    lock.acquire(force=True, timeout=30, poll=5)
    assert time.monotonic() - started < 2
    assert ours(store, lock)


def test_dead_pid_on_this_host_is_taken_over_at_once(store, locks, dead_pid):
    store.write_json(LOCK, holder(host=socket.gethostname(), pid=dead_pid))
    lock = locks(store)
    started = time.monotonic()
    lock.acquire(timeout=30, poll=5)
    assert time.monotonic() - started < 2
    assert ours(store, lock)


def test_dead_pid_on_another_host_is_not_taken_over(store, locks, dead_pid):
    store.write_json(LOCK, holder(pid=dead_pid))  # that pid may well live over there
    with pytest.raises(ConfigError):
        locks(store).acquire(timeout=0.2, poll=0.05)


def test_same_owner_id_takes_over(store, locks, monkeypatch):
    monkeypatch.setenv("TRAINJOB_OWNER_ID", "job-uid-1")
    store.write_json(LOCK, holder(owner="job-uid-1"))
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    assert ours(store, lock)
    assert store.read_json(LOCK)["owner"] == "job-uid-1"


def test_other_owner_id_waits(store, locks, monkeypatch):
    monkeypatch.setenv("TRAINJOB_OWNER_ID", "job-uid-2")
    store.write_json(LOCK, holder(owner="job-uid-1"))
    with pytest.raises(ConfigError):
        locks(store).acquire(timeout=0.2, poll=0.05)


def test_release_deletes_only_our_own_lock(store, locks):
    first = locks(store)
    first.acquire(timeout=5, poll=0.05)
    second = locks(store)
    second.acquire(force=True, timeout=5, poll=0.05)  # takes it over
    first.release()
    assert ours(store, second), "release() removed a lock another job holds"
    second.release()
    assert store.read_json(LOCK) is None


def test_release_without_a_lock_is_harmless(store, locks):
    locks(store).release()
    record = holder()
    store.write_json(LOCK, record)
    locks(store).release()  # never acquired: the other job's lock stays
    assert store.read_json(LOCK) == record


def test_heartbeat_refreshes_only_our_lock(store, locks):
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    before = store.read_json(LOCK)["heartbeat"]
    time.sleep(0.05)
    lock.heartbeat()
    assert store.read_json(LOCK)["heartbeat"] > before
    taken = holder()
    store.write_json(LOCK, taken)
    lock.heartbeat()
    assert store.read_json(LOCK) == taken, "a heartbeat overwrote the new holder's lock"
    assert lock.lost.is_set()
    lock.release()
    assert store.read_json(LOCK) == taken


def test_unreadable_lock_file_is_treated_as_free(store, locks):
    store.write_bytes(LOCK, b"{not json")
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    assert ours(store, lock)


def test_heartbeat_thread_keeps_the_lock_fresh(store, locks, monkeypatch):
    monkeypatch.setattr("trainjob.run.lock.HEARTBEAT_SECONDS", 0.05)
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    first = store.read_json(LOCK)["heartbeat"]
    deadline = time.monotonic() + 5
    while store.read_json(LOCK)["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.read_json(LOCK)["heartbeat"] > first, "no heartbeat from the thread"
    lock.release()
    lock._thread.join(5)  # any beat still to come has come
    assert not lock._thread.is_alive(), "the heartbeat thread outlived release()"
    assert store.read_json(LOCK) is None, "a heartbeat after release() re-created the lock"
    # A beat after the delete is a conditional write to a missing object: refused, and read
    # as a take-over. Only a release that waits for the beat in flight avoids that.
    assert not lock.lost.is_set(), "a heartbeat after release() marked the lock lost"


class SlowBeatStore(LocalStore):
    """Holds writes made by the heartbeat thread at a gate."""

    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()
        self.beat_writing = threading.Event()
        self.beat_landed = threading.Event()

    def put_if_match(self, key, data, etag):
        if threading.current_thread().name != "trainjob-lock":
            return super().put_if_match(key, data, etag)
        self.beat_writing.set()
        self.gate.wait(5)
        try:
            return super().put_if_match(key, data, etag)
        finally:
            self.beat_landed.set()


def test_release_waits_for_a_heartbeat_in_flight(tmp_path, locks, monkeypatch):
    monkeypatch.setattr("trainjob.run.lock.HEARTBEAT_SECONDS", 0.01)
    store = SlowBeatStore(tmp_path / "run")
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    assert store.beat_writing.wait(5)
    threading.Timer(0.3, store.gate.set).start()  # the beat's write lands a little later
    lock.release()
    assert store.beat_landed.is_set(), "release() returned with a heartbeat still in flight"
    lock._thread.join(5)  # whatever the beat does next, it has done
    assert store.read_json(LOCK) is None
    # The late beat would meet a deleted lock (a refused conditional write), which reads as a
    # take-over: the job would think another one owns the run it has just let go of.
    assert not lock.lost.is_set(), "a heartbeat landing after the delete marked the lock lost"


# --- compare-and-swap and fencing -------------------------------------------------------------

def assert_lost(lock: RunLock, *needles: str) -> str:
    assert lock.lost.is_set()
    with pytest.raises(LostOwnership) as err:
        lock.check()
    assert err.value.exit_code == 6 and 6 in NON_RETRIABLE
    message = str(err.value)
    assert "\n" not in message and "--force" in message and LOCK in message
    for needle in needles:
        assert needle in message, message
    return message


def test_every_backend_takes_conditional_writes_and_the_probe_cleans_up(store, locks):
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    assert lock.conditional is True
    assert [o.key for o in store.list("")] == [LOCK], "the probe object was left behind"
    lock.check()  # held: no error


def test_takeover_fences_the_old_holder(store, locks):
    first = locks(store)
    first.acquire(timeout=5, poll=0.05)
    second = locks(store)
    second.acquire(force=True, timeout=5, poll=0.05)
    assert not first.lost.is_set()  # it learns at its next heartbeat
    first.heartbeat()
    assert_lost(first, f"{socket.gethostname()} pid {os.getpid()}")
    assert ours(store, second)
    first.heartbeat()  # a lost lock is never refreshed again
    first.release()
    assert ours(store, second)
    second.heartbeat()
    assert not second.lost.is_set() and ours(store, second)
    second.check()


def test_removed_lock_counts_as_lost(store, locks):
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    store.delete([LOCK])
    lock.heartbeat()
    assert_lost(lock, "removed")
    assert store.read_json(LOCK) is None, "the heartbeat re-created a removed lock"


def test_heartbeat_is_one_conditional_write_and_no_read(store, locks):
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    calls: list[str] = []
    for name in ("read_bytes", "read_versioned", "read_info", "write_bytes", "put_if_absent",
                 "put_if_match", "delete", "delete_if_match"):
        real = getattr(store, name)
        setattr(store, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                     _real(*a, **k))[1])
    for _ in range(3):
        lock.heartbeat()
    assert calls == ["put_if_match"] * 3
    assert not lock.lost.is_set()


def test_a_beat_whose_reply_was_lost_is_not_a_takeover(store, locks):
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    # Our own write landed, but we never saw its ETag (a PUT retried after its reply was
    # lost gets 412): the version holds our token, so the lock is still ours.
    store.write_bytes(LOCK, lock._record_bytes())
    lock.heartbeat()
    assert not lock.lost.is_set()
    before = store.read_versioned(LOCK)[1]
    time.sleep(0.01)
    lock.heartbeat()
    assert store.read_versioned(LOCK)[1] != before and not lock.lost.is_set()
    store.write_bytes(LOCK, lock._record_bytes())  # the same, just before the release
    lock.release()
    assert store.read_json(LOCK) is None


def test_lost_lock_stops_the_heartbeat_thread(store, locks, monkeypatch):
    monkeypatch.setattr("trainjob.run.lock.HEARTBEAT_SECONDS", 0.05)
    lock = locks(store)
    lock.acquire(timeout=5, poll=0.05)
    taken = holder()
    store.write_json(LOCK, taken)
    assert lock.lost.wait(5), "the heartbeat thread did not notice the take-over"
    lock._thread.join(5)
    assert not lock._thread.is_alive()
    assert_lost(lock, "other-host-7 pid 4242")
    assert store.read_json(LOCK) == taken


def test_threads_racing_for_a_free_lock_never_both_get_it(store, locks):
    for _ in range(3):
        contenders = [locks(store), locks(store)]
        for lock in contenders:
            lock.probe()
        barrier = threading.Barrier(2)
        results: dict[str, str] = {}

        def take(lock: RunLock) -> None:
            barrier.wait()
            try:
                lock.acquire(timeout=0.3, poll=0.02)
                results[lock.token] = "held"
            except ConfigError:
                results[lock.token] = "gave up"

        threads = [threading.Thread(target=take, args=(lock,)) for lock in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results.values()) == ["gave up", "held"]
        winner = next(lock for lock in contenders if results[lock.token] == "held")
        assert ours(store, winner)
        winner.release()
        assert store.read_json(LOCK) is None


def test_timings_come_from_the_test_hooks_file(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "run")
    monkeypatch.delenv("TRAINJOB_TEST_HOOKS", raising=False)
    lock = RunLock(store)
    assert (lock.heartbeat_every, lock.stale_after) == (HEARTBEAT_SECONDS, STALE_SECONDS)
    hooks = tmp_path / "hooks.json"
    hooks.write_text('{"lock_heartbeat_seconds": 0.25, "lock_stale_seconds": 3}')
    monkeypatch.setenv("TRAINJOB_TEST_HOOKS", str(hooks))
    lock = RunLock(store)
    assert (lock.heartbeat_every, lock.stale_after) == (0.25, 3.0)
    assert RunLock(store, stale_after=9, heartbeat_every=1).stale_after == 9  # arguments win
    hooks.write_text("{not json")
    with pytest.raises(ConfigError) as err:
        RunLock(store)
    assert "TRAINJOB_TEST_HOOKS" in str(err.value) and "\n" not in str(err.value)


def test_probe_name_is_never_published():
    from trainjob.run.folder import NOT_PUBLISHED

    assert PROBE_PREFIX.startswith(".") and "." in NOT_PUBLISHED
