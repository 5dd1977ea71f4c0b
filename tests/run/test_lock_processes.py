"""The run lock between real processes on a real server (SeaweedFS, over HTTP): two jobs
that start at the same instant, a take-over that fences the old holder, and a server that
ignores conditional writes. The processes are tests/lockworker.py."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_bucket, point_boto3_at
from helpers.faultproxy import FaultProxy

from trainjob.errors import LostOwnership
from trainjob.run.folder import LOCK
from trainjob.run.lock import RunLock
from trainjob.store import client
from trainjob.store.s3 import S3Store

WORKER = str(Path(__file__).parents[1] / "helpers" / "lockworker.py")
ROUNDS, PERIOD = 10, 0.8


def worker(mode: str, uri: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, mode, uri, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINJOB_"))}


@pytest.mark.parametrize("backend", ["seaweedfs", "local"])
def test_two_jobs_starting_together_never_both_hold(backend, request, tmp_path):
    if backend == "seaweedfs":
        server = request.getfixturevalue("seaweed")
        bucket = make_bucket(server)
        uri, env = f"s3://{bucket}/race", server.env()
    else:
        uri, env = str(tmp_path / "race"), plain_env()
    start_at = time.time() + 2.0  # both processes are up and waiting by then
    procs = [worker("race", uri, str(start_at), str(ROUNDS), str(PERIOD), env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60 + ROUNDS * PERIOD) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    rows = [[json.loads(line) for line in out.splitlines() if line.startswith("{")]
            for out, _ in outputs]
    assert [len(r) for r in rows] == [ROUNDS, ROUNDS]
    for pair in zip(*rows):
        assert sorted(r["outcome"] for r in pair) == ["gave up", "held"], pair
        winner = next(r for r in pair if r["outcome"] == "held")
        loser = next(r for r in pair if r["outcome"] == "gave up")
        assert winner["still_ours"], pair
        assert loser["exit_code"] == 2
        message = loser["message"]
        assert "\n" not in message and "--force" in message
        assert f"pid {winner['pid']}" in message
        assert loser["seconds"] >= PERIOD * 0.3 - 0.01, "gave up without waiting"
    # The premise: each round's two acquires really started together (wall-clock barrier).
    gaps = [abs(a["late"] - b["late"]) for a, b in zip(*rows)]
    assert statistics.median(gaps) < 0.05, gaps
    if backend == "seaweedfs":
        assert server.keys(bucket) == {}, "a lock or probe object was left behind"
    else:
        assert not list(Path(uri).rglob("*.json")) and not list(Path(uri).rglob(".*"))


@pytest.mark.parametrize("how", ["force", "stale"])
def test_takeover_fences_the_old_holder(how, seaweed, tmp_path, monkeypatch):
    bucket = make_bucket(seaweed)
    beat = 0.3 if how == "force" else 1.5
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps({"lock_heartbeat_seconds": beat}))
    lock_path = f"/{bucket}/run/{LOCK}"
    with FaultProxy(seaweed.endpoint) as proxy:  # no faults: it counts the holder's requests
        env = seaweed.env(AWS_ENDPOINT_URL=proxy.endpoint, TRAINJOB_TEST_HOOKS=str(hooks))
        holder = worker("hold", f"s3://{bucket}/run", env=env)
        line = holder.stdout.readline()
        assert line, holder.communicate(timeout=30)[1][-3000:]
        first = json.loads(line)
        assert first["heartbeat_every"] == beat  # the hooks file reached the process
        if how == "force":  # a few heartbeats first: counted where they land
            deadline = time.monotonic() + 60
            while sum(1 for s in proxy.seen if s.method == "PUT" and s.status == 200
                      and s.at > first["acquired_at"]) < 4:
                assert time.monotonic() < deadline and holder.poll() is None, "no heartbeats"
                time.sleep(0.05)
        point_boto3_at(seaweed, monkeypatch, tmp_path)  # the new job talks to the server directly
        store = S3Store(bucket, "run", threads=2)
        taker = RunLock(store, stale_after=None if how == "force" else 0.5)
        try:
            taker.acquire(force=how == "force", timeout=10, poll=0.05)
            out, err = holder.communicate(timeout=beat * 2 + 20)
            assert holder.returncode == 6, out[-2000:] + err[-2000:]
            assert store.read_json(LOCK)["token"] == taker.token, "the old holder wrote again"
            taker.heartbeat()
            assert not taker.lost.is_set()
        finally:
            holder.kill()
            taker.release()
            client._clients.clear()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("trainjob: error: lost the run lock s3://")
    assert f"{socket.gethostname()} pid {os.getpid()}" in lines[0] and "--force" in lines[0]
    # After acquiring, the holder sent heartbeats only: each one conditional PUT and nothing
    # else; the last was refused (412) and one GET then read who holds the lock now.
    after = [s for s in proxy.seen if s.at > first["acquired_at"]]
    puts = [s for s in after if s.method == "PUT"]
    # (The stale take-over may come before the holder's first beat: then the 412 is all.)
    assert len(puts) >= (5 if how == "force" else 1), after
    assert all(s.path == lock_path and "if-match" in s.headers for s in puts), puts
    assert [s.status for s in puts] == [200] * (len(puts) - 1) + [412]
    others = [(s.method, s.path) for s in after if s.method != "PUT"]
    assert others == [("GET", lock_path)]
    assert next(s for s in after if s.method == "GET").at > puts[-1].at


def test_server_without_conditional_writes_gets_one_warning(seaweed, tmp_path):
    bucket = make_bucket(seaweed)
    # The control: SeaweedFS itself honours them, and no warning is printed.
    direct = worker("once", f"s3://{bucket}/direct", env=seaweed.env())
    out, err = direct.communicate(timeout=60)
    assert direct.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1]) == {"conditional": True, "lost": False}
    assert not [line for line in out.splitlines() if line.startswith("WARNING")], out

    keys = (seaweed.access_key, seaweed.secret_key)
    with FaultProxy(seaweed.endpoint, strip_conditional=keys) as proxy:
        job = worker("once", f"s3://{bucket}/run", env=seaweed.env(AWS_ENDPOINT_URL=proxy.endpoint))
        out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err[-3000:]
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, out
    assert "advisory" in warnings[0] and f"s3://{bucket}/run" in warnings[0]
    assert json.loads(out.splitlines()[-1]) == {"conditional": False, "lost": False}
    assert any("if-none-match" in s.headers for s in proxy.seen)  # the client did ask
    assert seaweed.keys(bucket) == {}, "the probe or the lock was left behind"


def test_advisory_lock_still_fences_by_token(seaweed, tmp_path, monkeypatch, caplog):
    bucket = make_bucket(seaweed)
    keys = (seaweed.access_key, seaweed.secret_key)
    with FaultProxy(seaweed.endpoint, strip_conditional=keys) as proxy:
        point_boto3_at(seaweed, monkeypatch, tmp_path, AWS_ENDPOINT_URL=proxy.endpoint)
        store = S3Store(bucket, "run", threads=2)
        first, second = RunLock(store), RunLock(store)
        try:
            first.acquire(timeout=5, poll=0.05)
            assert first.conditional is False
            second.acquire(force=True, timeout=5, poll=0.05)
            first.heartbeat()
            assert first.lost.is_set()
            with pytest.raises(LostOwnership) as lost:
                first.check()
            assert lost.value.exit_code == 6
            first.release()
            assert store.read_json(LOCK)["token"] == second.token
        finally:
            second.release()
            client._clients.clear()
    assert seaweed.keys(bucket) == {}
    advisory = [r for r in caplog.records if "advisory" in r.getMessage()]
    assert len(advisory) == 2 and all(r.levelname == "WARNING" for r in advisory)  # one per job


def test_lost_replies_do_not_cost_the_lock(seaweed, tmp_path, monkeypatch):
    """A request the server carried out but whose reply was lost is retried by botocore and
    then meets 412 (its own first try changed the ETag). The lock must see its own token and
    carry on: no false 'lost', no advisory fallback, nothing left behind."""
    bucket = make_bucket(seaweed)
    # 15%: more would drain botocore's retry quota (10 tokens a connection error, of 500).
    with FaultProxy(seaweed.endpoint, lost_reply=0.15, seed=4) as proxy:
        point_boto3_at(seaweed, monkeypatch, tmp_path, AWS_ENDPOINT_URL=proxy.endpoint,
                       AWS_MAX_ATTEMPTS="10")
        store = S3Store(bucket, "run", threads=2)
        try:
            for _ in range(4):
                lock = RunLock(store)
                lock.acquire(timeout=10, poll=0.05)
                assert lock.conditional is True
                for _ in range(5):
                    lock.heartbeat()
                    assert not lock.lost.is_set()
                lock.release()
                assert store.read_json(LOCK) is None
        finally:
            client._clients.clear()
    assert proxy.injected["lost_reply"] >= 5, proxy.injected
    lost_puts = [s for s in proxy.seen if s.method == "PUT" and s.status == 0]
    assert len(lost_puts) >= 3, "no conditional write lost its reply: the test proved nothing"
    assert seaweed.keys(bucket) == {}
