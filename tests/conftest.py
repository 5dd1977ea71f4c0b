"""Shared fixtures: real S3 servers over HTTP, generated datasets, a CLI runner.

No S3 call in these tests is mocked in-process: the job talks HTTP to a separate server
process, exactly as it talks to MinIO or AWS. ``s3`` is moto_server (quick, used by the
unit-level storage tests and the fault proxy); ``seaweed`` is SeaweedFS, a real object
store; ``server`` is each of the two in turn, for the end-to-end core.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sampledata  # noqa: E402
from helpers.faultproxy import FaultProxy  # noqa: E402
from s3server import S3Server, start_moto, start_seaweed, stop_server  # noqa: E402

from trainjob.store.client import _clients  # noqa: E402
from trainjob.store.local import LocalStore  # noqa: E402
from trainjob.store.s3 import S3Store  # noqa: E402

# SGD: ResNet50's train step traces in about half of Adam's time (measured: first batch
# 22 s against 45 s), and every training subprocess pays that once. The default (Adam) is
# kept where it is the subject: the core kill-and-resume run and learnability.
SMALL = ["--image-size", "32", "--batch-size", "8", "--max-bad-fraction", "0.25",
         "--threads", "4", "--optimizer", "sgd"]
# Test hooks for the runs whose subject is the store, the lock, the uploader or the run
# state, not the model: a stand-in backbone with ResNet50's weight count, so checkpoints and
# resume pairs have ResNet50's bytes, without its tracing (about 25 s of a core per process)
# or its steps (model.stand_in_backbone). ResNet50 itself is trained where it is the subject:
# learnability, the core run on moto, the second SIGTERM and the containers.
STAND_IN = {"stand_in_backbone": True}
# Where the bytes are not the subject either (several workers, fine-tuning phases): the
# same layers with few weights, so no CPU goes to 94 MB all-reduces and checkpoints.
SMALL_STAND_IN = {"stand_in_backbone": "small"}


# The slowest tests, slowest first (measured: docs/testing.md). Both xdist workers are busy
# to the end only if the long tests start first: one started last keeps the other worker
# idle meanwhile. The Docker group (one xdist unit: the image build and two container
# runs) goes first of all; the quick tests fill in at the end.
SLOWEST_FIRST = [
    "test_learns_three_solid_colours_with_local_paths",
    "test_official_zip_killed_resumed_and_pulled",
    "test_sigterm_then_peer_killed_then_group_restart_completes",
    "test_sigterm_mid_epoch_then_late_sigterm_then_resume",
    "test_a_short_outage_does_not_fail_the_run",
    "test_two_workers_read_disjoint_shards_and_resume_mid_epoch_exactly",
    "test_fast_epochs_keep_the_bucket_advancing_and_a_random_kill_resumes",
    "test_a_run_killed_and_resumed_is_one_mlflow_run_with_each_epoch_once",
    "test_resume_across_the_phase_boundary",
    "test_uploads_failing_after_retries_exit_4_and_keep_local_files",
    "test_shutdown_fits_the_grace_period_when_the_store_hangs",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: (item.get_closest_marker("xdist_group") is None,
                                 rank.get(item.originalname, len(rank)),
                                 item.get_closest_marker("e2e") is None))


def pytest_configure(config: pytest.Config) -> None:
    """From pytest 9.2, xdist's --dist loadgroup silently stops grouping (pytest-xdist#1386):
    the Docker group would land on both workers, and one worker's dockerd stop the other's
    engine under its tests. Say so in one line instead."""
    version = tuple(int(part) for part in pytest.__version__.split(".")[:2])
    if config.getoption("dist", None) == "loadgroup" and version >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} does not group tests under --dist loadgroup "
            "(pytest-xdist#1386): install the test extra's pytest<9.2 (pyproject.toml)")


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Server:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> S3Server:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield server
    stop_server(server, grace=0)  # its data is throwaway: skip the clean shutdown's seconds


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite), started once per test worker."""
    from helpers.mlflowserver import start_mlflow, stop_mlflow

    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop_mlflow(server)


SERVERS = {"moto": "s3", "seaweedfs": "seaweed"}


@pytest.fixture(scope="session", params=list(SERVERS))
def server(request) -> S3Server:
    """Each real S3 server in turn: a test that takes it runs once per server."""
    return request.getfixturevalue(SERVERS[request.param])


def server_of(request: pytest.FixtureRequest) -> S3Server:
    """The server a test runs against: ``server`` where it takes that, else moto (``s3``)."""
    return request.getfixturevalue("server" if "server" in request.fixturenames else "s3")


def point_boto3_at(server: S3Server, monkeypatch, tmp_path: Path, **env: str) -> None:
    """boto3's standard chain in this process talks to ``server``, with fresh clients."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in server.env(**env).items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    _clients.clear()


@pytest.fixture
def s3env(s3, monkeypatch, tmp_path):
    """Point boto3's standard chain at the test server; fresh clients before and after."""
    point_boto3_at(s3, monkeypatch, tmp_path, AWS_MAX_ATTEMPTS="2")
    yield s3
    _clients.clear()


@pytest.fixture
def through_proxy(s3env, monkeypatch):
    """Start a FaultProxy in front of the test server and point trainjob's client at it."""
    def start(**modes) -> FaultProxy:
        proxy = FaultProxy(s3env.endpoint, **modes).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        _clients.clear()
        return proxy
    proxies: list[FaultProxy] = []
    yield start
    for proxy in proxies:
        proxy.__exit__(None, None, None)


_clients_by_endpoint: dict[str, dict] = {}  # trainjob's boto3 clients, kept per test server


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request, tmp_path, monkeypatch):
    """A run folder on each backend: a local folder, a prefix on moto, one on SeaweedFS."""
    monkeypatch.delenv("TRAINJOB_OWNER_ID", raising=False)
    monkeypatch.delenv("TRAINJOB_TEST_HOOKS", raising=False)
    if request.param == "local":
        yield LocalStore(tmp_path / "run")
        return
    server = request.getfixturevalue(SERVERS[request.param])
    point_boto3_at(server, monkeypatch, tmp_path)
    # Same server, same settings: reuse its clients (a new one costs up to a second).
    _clients.update(_clients_by_endpoint.get(server.endpoint, {}))
    yield S3Store(make_bucket(server), "runs/exp1", threads=2)
    _clients_by_endpoint[server.endpoint] = dict(_clients)
    _clients.clear()


def make_bucket(server: S3Server) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(request) -> str:
    """A fresh bucket on the test's server (see ``server_of``)."""
    return make_bucket(server_of(request))


@pytest.fixture(scope="session")
def class_folders(tmp_path_factory) -> Path:
    """10 classes x 8 images, grayscale/CMYK/PNG-as-jpg/truncated/empty/non-image files,
    and a BACKGROUND_Google folder."""
    root = tmp_path_factory.mktemp("classes") / "101_ObjectCategories"
    names = sampledata.make_class_folders(root, classes=6, per_class=8)
    sampledata.add_bad_files(root, names)
    return root


@pytest.fixture(scope="session")
def official_zip(class_folders: Path, tmp_path_factory) -> Path:
    return sampledata.make_official_zip(tmp_path_factory.mktemp("zip") / "caltech-101.zip",
                                        class_folders)


def upload_tree(s3: S3Server, bucket: str, root: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}{path.relative_to(root).as_posix()}")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        """stderr lines of trainjob's own (TensorFlow's C++ start-up noise excluded)."""
        return [line for line in self.stderr.splitlines() if line.strip()
                and not _tf_noise(line)]


def _tf_noise(line: str) -> bool:
    return line.startswith(("WARNING: All log messages before absl", "I0000", "E0000", "W0000"))


def free_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now (for worker processes to bind)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def consecutive_free_ports(n: int, tries: int = 50) -> int:
    """The first of n consecutive TCP ports free on 127.0.0.1 right now (--worker-port's
    workers listen on the port plus their index: free_ports' ports are not consecutive)."""
    for _ in range(tries):
        first = free_ports(1)[0]
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in {tries} tries")


def trainjob_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainjob.cli", *args]


def run_trainjob(args: list[str], env: dict[str, str], home: Path, timeout: float = 600) -> Result:
    env = {**env, "TRAINJOB_HOME": str(home)}
    proc = subprocess.run(trainjob_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_trainjob(args: list[str], env: dict[str, str], home: Path, log: Path) -> subprocess.Popen:
    env = {**env, "TRAINJOB_HOME": str(home)}
    out = open(log, "wb")
    return subprocess.Popen(trainjob_cmd(*args), env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def dataset(request, bucket, official_zip) -> str:
    """The official-layout zip in the test's bucket, on the test's server (see server_of)."""
    server_of(request).client().upload_file(str(official_zip), bucket,
                                            "datasets/caltech-101.zip")
    return f"s3://{bucket}/datasets/caltech-101.zip"
