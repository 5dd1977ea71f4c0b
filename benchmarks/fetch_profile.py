"""Where a prefix fetch spends its time, object by object (called by fetch.py).

Each step runs alone over the same SAMPLE objects, one at a time, so its wall and CPU time
per object are its own: the listing (botocore's timestamp parsing against trainjob's), the
old download path (s3transfer's ``download_file``), botocore's full ``get_object`` call,
trainjob's signed GET, SigV4 signing alone, the local file work with and without fsync.
Then the whole fetch at THREADS threads, old path against new: wall, CPU, the peak number
of threads and the TCP connections opened (the connection pool against the thread count).
"""

from __future__ import annotations

import http.client
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import botocore.auth
import botocore.awsrequest
import urllib3.connection

SAMPLE, THREADS = 300, 16


def _check(outcome) -> None:
    assert isinstance(outcome, tuple), outcome  # (etag, size): the GET went through


def per_object(fn: Callable[[int], None], count: int) -> dict[str, float]:
    fn(0)  # warm: connections, imports
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        fn(i)
    return {"wall_us": round((time.perf_counter() - start) / count * 1e6),
            "cpu_us": round((time.process_time() - cpu) / count * 1e6)}


class Watch:
    """Peak thread count and TCP connections opened while it is active."""

    def __init__(self) -> None:
        self.peak, self.connections, self._stop = 0, 0, threading.Event()

    CLASSES = (urllib3.connection.HTTPConnection, http.client.HTTPConnection)  # botocore's, ours

    def __enter__(self) -> Watch:
        self._real = [cls.connect for cls in self.CLASSES]
        watch = self
        for cls, real in zip(self.CLASSES, self._real, strict=True):
            def counting_connect(conn, *args, _real=real, **kwargs):
                watch.connections += 1
                return _real(conn, *args, **kwargs)
            cls.connect = counting_connect
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, threading.active_count() - 1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for cls, real in zip(self.CLASSES, self._real, strict=True):
            cls.connect = real


def profile(server, bucket: str, prefix: str, work: Path) -> dict:
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in server.env().items() if k.startswith("AWS_")})
    try:
        return _profile(server, bucket, prefix, work)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _profile(server, bucket: str, prefix: str, work: Path) -> dict:
    from trainjob.store import fetch, transfer
    from trainjob.store.client import _clients, signing_credentials
    from trainjob.store.s3 import S3Store

    _clients.clear()
    store = S3Store(bucket, "", THREADS)
    client, stock = store.client, server.client()  # stock: botocore's own timestamp parser
    work.mkdir(parents=True, exist_ok=True)
    keys = [o.key for o in store.list(prefix)]
    sample = keys[:SAMPLE + 1]
    out: dict[str, dict] = {}

    def listing(c) -> Callable[[int], None]:
        def run(_: int) -> None:
            for _page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
                pass
        return run

    for name, c in (("list, botocore timestamps", stock), ("list, trainjob timestamps", client)):
        t = per_object(listing(c), 3)
        out[name] = {k: round(v / len(keys), 1) for k, v in t.items()}  # per listed key

    dest = work / "obj"
    out["download_file (s3transfer, old path)"] = per_object(
        lambda i: client.download_file(bucket, sample[i], str(dest), Config=store.transfer),
        SAMPLE)

    def full_call(i: int) -> None:
        body = client.get_object(Bucket=bucket, Key=sample[i])["Body"]
        with open(dest, "wb") as f:
            f.write(body.read())

    out["get_object (full botocore call)"] = per_object(full_call, SAMPLE)
    fast = transfer._FastGet.create(client, bucket)
    assert fast is not None, "the fast path is unavailable"
    out["signed GET on http.client (new path)"] = per_object(
        lambda i: _check(fast.get(sample[i], dest)), SAMPLE)
    creds = signing_credentials(client)

    def sign(i: int) -> None:
        request = botocore.awsrequest.AWSRequest("GET", fast.base_url + sample[i])
        botocore.auth.S3SigV4Auth(creds.get_frozen_credentials(), "s3",
                                  fast.region).add_auth(request)
        request.prepare()

    out["SigV4 signing alone"] = per_object(sign, SAMPLE)
    files = work / "files"
    files.mkdir()
    data = os.urandom(3600)

    def write(i: int, sync: bool = False) -> None:
        tmp, final = files / f".{i}.part", files / f"{i}.jpg"
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)

    out["write + rename a 3.6 KB file"] = per_object(write, SAMPLE)
    out["write + fsync + rename"] = per_object(lambda i: write(i + SAMPLE + 1, True), SAMPLE)

    whole: dict[str, dict] = {}
    old_root = work / "old"

    def old_fetch() -> None:  # what fetch did before: list, then download_file per object
        objects = store.list(prefix)
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda o: store.get(o.key, old_root / o.key), objects))

    for name, run in (("old: download_file per object", old_fetch),
                      ("new: fetch.fetch", lambda: fetch.fetch(
                          f"s3://{bucket}/{prefix}", work / "cache", THREADS))):
        _clients.clear()  # fresh pool: count every connection
        store = S3Store(bucket, "", THREADS)
        with Watch() as watch:
            start, cpu = time.perf_counter(), time.process_time()
            run()
            wall, used = time.perf_counter() - start, time.process_time() - cpu
        whole[name] = {"wall_s": round(wall, 2), "cpu_s": round(used, 2),
                       "cpu_ms_per_object": round(used / len(keys) * 1e3, 2),
                       "peak_threads": watch.peak, "connections_opened": watch.connections}
    shutil.rmtree(work, ignore_errors=True)
    return {"per_object": out, "sample": SAMPLE, "whole_fetch": whole, "threads": THREADS}
