"""A process that takes the run lock the way a job does, for the lock tests: real processes
racing and fencing each other on a real server. S3 settings come from the environment.

    python lockworker.py race URI START_AT ROUNDS PERIOD
        round i: at START_AT + i * PERIOD (wall clock), acquire URI/round-i waiting at most
        PERIOD * 0.3 s; the winner holds it until PERIOD * 0.7 s, then releases. One JSON
        line per round.
    python lockworker.py hold URI
        acquire, print one JSON line, then call check() every 50 ms, as a training loop
        would, until it raises: print the job's one error line and exit with its code (6).
    python lockworker.py once URI
        acquire, beat once, release; log lines go to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from trainjob.errors import ConfigError, LostOwnership
from trainjob.run.folder import LOCK
from trainjob.run.lock import RunLock
from trainjob.store.uri import open_store


def race(uri: str, start_at: float, rounds: int, period: float) -> None:
    for i in range(rounds):
        store = open_store(f"{uri}/round-{i}", threads=2)
        lock = RunLock(store)
        lock.probe()  # once per run, as in acquire; done early so the race is the acquire
        t0 = start_at + i * period
        time.sleep(max(0.0, t0 - time.time()))
        began = time.time()
        row = {"round": i, "pid": os.getpid(), "late": round(began - t0, 4)}
        try:
            lock.acquire(timeout=period * 0.3, poll=0.02)
        except ConfigError as exc:
            row.update(outcome="gave up", exit_code=exc.exit_code, message=str(exc))
        else:
            row.update(outcome="held", token=lock.token)
            time.sleep(max(0.0, t0 + period * 0.7 - time.time()))
            held = store.read_json(LOCK) or {}
            row["still_ours"] = held.get("token") == lock.token
            lock.release()
        row["seconds"] = round(time.time() - began, 4)
        print(json.dumps(row), flush=True)


def hold(uri: str) -> int:
    lock = RunLock(open_store(uri, threads=2))
    lock.acquire(timeout=10, poll=0.05)
    print(json.dumps({"acquired_at": time.time(), "token": lock.token, "pid": os.getpid(),
                      "heartbeat_every": lock.heartbeat_every}), flush=True)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            lock.check()
            time.sleep(0.05)
    except LostOwnership as exc:
        print(f"trainjob: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 1


def once(uri: str) -> int:
    lock = RunLock(open_store(uri, threads=2))
    lock.acquire(timeout=10, poll=0.05)
    lock.heartbeat()
    lost = lock.lost.is_set()
    lock.release()
    print(json.dumps({"conditional": lock.conditional, "lost": lost}), flush=True)
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mode, uri = argv[0], argv[1]
    if mode == "race":
        race(uri, float(argv[2]), int(argv[3]), float(argv[4]))
        return 0
    return hold(uri) if mode == "hold" else once(uri)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
