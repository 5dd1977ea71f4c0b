"""A local S3 server for the demo, the tests and the benchmarks: moto_server as a child
process, reached over HTTP like any S3-compatible store, with IAM auth on so bad keys fail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def client(self, endpoint: str | None = None):
        return boto3.client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "TRAINJOB_"))}
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
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp / f"moto-{port}.log", "wb")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    prefix = ["nice", "-n", str(nice)] if nice else []
    proc = subprocess.Popen([*prefix, str(Path(sys.executable).parent / "moto_server"), "-H",
                             "127.0.0.1", "-p", str(port)], stdout=log, stderr=log, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
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


def stop_moto(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
