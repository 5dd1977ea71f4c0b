"""scripts/s3server.py: the local S3 servers the tests, the demo and the benchmarks run on."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import botocore.exceptions
import pytest
from s3server import S3Server, start_seaweed, stop_server


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, width // 2, 4))
            found.add((str(ipaddress.ip_address(packed)), int(hex_port, 16)))
    return found


def test_two_seaweed_servers_run_at_once_on_loopback_only(seaweed, tmp_path):
    second = start_seaweed(tmp_path, buckets=("alpha-bucket", "beta-bucket"))
    try:
        for server in (seaweed, second):
            listening = listening_addresses(server.process.pid)
            assert len(listening) >= 5, listening  # master, volume, filer, S3, gRPC...
            assert {addr for addr, _ in listening} == {"127.0.0.1"}, listening
        ports = [{p for _, p in listening_addresses(s.process.pid)} for s in (seaweed, second)]
        assert not ports[0] & ports[1]
        names = {b["Name"] for b in second.client().list_buckets()["Buckets"]}
        assert names == {"alpha-bucket", "beta-bucket"}
        assert second.secret_key != seaweed.secret_key
    finally:
        stop_server(second)
    assert second.process.poll() is not None


def test_seaweed_enforces_the_secret_key(seaweed):
    with pytest.raises(botocore.exceptions.ClientError) as err:
        seaweed.client(secret_key="not-the-secret").list_buckets()
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_server_fixture_gives_each_kind_a_working_bucket(server: S3Server, bucket: str):
    assert server.kind in ("moto", "seaweedfs")
    client = server.client()
    put = client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"
    assert put["ETag"].strip('"') == "5d41402abc4b2a76b9719d911017c592"  # md5, both servers
    assert server.keys(bucket) == {"a/b.txt": 5}
