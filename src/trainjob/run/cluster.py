"""Who trains together: the worker addresses and this process's index.

From ``TF_CONFIG`` when it is set; otherwise, inside a Kubernetes Indexed Job, from
``JOB_COMPLETION_INDEX``, ``--workers`` and the ``--worker-hosts`` pattern. Nothing here
imports TensorFlow: a bad setting fails in a second, before any data is fetched.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from trainjob.config import ClusterConfig
from trainjob.errors import ClusterError, ConfigError

log = logging.getLogger(__name__)

INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
MAX_KNOCK_BYTES = 1 << 20  # a knock's JSON line: the chief's carries a save point's record


@dataclass(frozen=True)
class Cluster:
    """The workers in index order; index 0 (or TF_CONFIG's chief) is the chief."""

    workers: tuple[str, ...]  # host:port
    index: int
    source: str  # where the layout came from, for the log and config.json
    tf_config: str  # what TensorFlow reads from the TF_CONFIG variable

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def size(self) -> int:
        return len(self.workers)

    def peers(self) -> list[tuple[int, str]]:
        return [(i, a) for i, a in enumerate(self.workers) if i != self.index]

    def describe(self) -> dict:
        return {"workers": self.size, "index": self.index, "source": self.source,
                "addresses": list(self.workers)}


def resolve(cfg: ClusterConfig, env: Mapping[str, str] = os.environ,
            hostname: str | None = None) -> Cluster | None:
    """The cluster this process belongs to, or None for a job that trains alone."""
    if env.get("TF_CONFIG"):
        return _from_tf_config(env["TF_CONFIG"])
    if cfg.workers == 1:
        return None
    raw = env.get(INDEX_ENV)
    if raw is None:
        raise ConfigError(f"--workers {cfg.workers} needs {INDEX_ENV} (set in each pod of a "
                          "Kubernetes Indexed Job) or TF_CONFIG to know which worker this is")
    if not raw.isdigit() or int(raw) >= cfg.workers:
        raise ConfigError(f"{INDEX_ENV}={raw} is not a worker index below --workers "
                          f"{cfg.workers}")
    index = int(raw)
    host = hostname or socket.gethostname()
    job = host[:-len(f"-{index}")] if host.endswith(f"-{index}") else host
    try:
        addresses = tuple(_address(cfg.worker_hosts.format(
            index=i, job=job, service=cfg.worker_service, port=cfg.worker_port + i),
            cfg.worker_port) for i in range(cfg.workers))
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigError(f"--worker-hosts {cfg.worker_hosts!r}: bad pattern ({exc}); use "
                          "{index}, {job}, {service} and {port}") from exc
    tf_config = {"cluster": {"worker": list(addresses)}, "task": {"type": "worker",
                                                                  "index": index}}
    return Cluster(addresses, index, f"{INDEX_ENV} and --workers", json.dumps(tf_config))


def _address(host: str, port: int) -> str:
    return host if ":" in host.rsplit("]", 1)[-1] else f"{host}:{port}"


def _from_tf_config(raw: str) -> Cluster | None:
    """TF_CONFIG's cluster flattened in TensorFlow's order: chief first, then workers."""
    try:
        spec = json.loads(raw)
        jobs, task = spec["cluster"], spec["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not a valid cluster spec ({exc}): expected "
                          '{"cluster": {"worker": [...]}, "task": {"type": ..., "index": ...}}'
                          ) from exc
    extra = set(jobs) - {"chief", "worker"}
    if extra or kind not in ("chief", "worker"):
        raise ConfigError(f"TF_CONFIG has {sorted(extra) or kind!r}: trainjob trains with "
                          "MultiWorkerMirroredStrategy, which takes chief and worker tasks only")
    chiefs, workers = list(jobs.get("chief", [])), list(jobs.get("worker", []))
    everyone = tuple(chiefs + workers)
    position = index if kind == "chief" else len(chiefs) + index
    if position >= len(everyone):
        raise ConfigError(f"TF_CONFIG task {kind} {index} is not in its cluster")
    if len(everyone) == 1:
        return None
    return Cluster(everyone, position, "TF_CONFIG", raw)


def wait_for_peers(cluster: Cluster, timeout: float, *, announce: dict | None = None,
                   on_announce: Callable[[dict, float], None] | None = None) -> dict | None:
    """A barrier over plain TCP on the workers' own ports, before TensorFlow binds them.

    TensorFlow's MultiWorkerMirroredStrategy waits for its peers without a limit, holding
    the GIL (neither a time-out nor a signal handler can run meanwhile). So the workers
    meet here first: each listens on its port and connects to every peer's, and keeps
    listening until every peer has connected to it, so no peer can miss it. Raises
    ClusterError naming the workers that did not come within ``timeout`` seconds.

    Each knock is one JSON line, ``{"worker": <index>}``; the chief's also carries
    ``announce`` (what every worker must start from). A worker that is not the chief hands
    the chief's message to ``on_announce(message, deadline)`` before it knocks on the
    chief's port, so the chief leaves the barrier only once every worker has acted on it.
    Returns the chief's message (None where no worker was given ``on_announce``)."""
    port = int(cluster.workers[cluster.index].rpartition(":")[2])
    try:
        listener = socket.create_server(("", port))
    except OSError as exc:  # retriable: a previous worker on this host may still hold it
        where = "--worker-port" if cluster.source != "TF_CONFIG" else "TF_CONFIG"
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ClusterError(
            f"worker {cluster.index} cannot listen on port {port} ({why}): another process "
            f"on this host holds it; stop it, or give the workers free ports ({where})") from exc
    listener.settimeout(0.2)
    knock = (json.dumps({**(announce or {}), "worker": cluster.index}) + "\n").encode()
    everyone = {i for i, _ in cluster.peers()}
    reached: set[int] = set()
    heard: dict[int, dict] = {}
    # The chief is knocked on only once its message has been acted on.
    ready = cluster.is_chief or on_announce is None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for i, address in cluster.peers():
                if i not in reached and (ready or i != 0) and _knock(address, knock):
                    reached.add(i)
            message = _heard(listener)
            if message is not None and message["worker"] in everyone:
                heard.setdefault(message["worker"], message)
            if not ready and 0 in heard:
                on_announce(heard[0], deadline)
                ready = True
            if reached >= everyone and heard.keys() >= everyone:
                log.info("worker %d: all %d workers are up", cluster.index, cluster.size)
                return announce if cluster.is_chief else heard.get(0)
    finally:
        listener.close()
    missing = [f"worker {i} ({a})" for i, a in cluster.peers()
               if i not in reached & heard.keys()]
    raise ClusterError(
        f"worker {cluster.index}: {', '.join(missing)} did not join within --cluster-timeout "
        f"{timeout:g}s; check that all {cluster.size} workers are running and that their "
        "addresses resolve from here")


def _knock(address: str, message: bytes) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0) as conn:
            conn.sendall(message)
        return True
    except (OSError, ValueError):
        return False


def _heard(listener: socket.socket) -> dict | None:
    """The message of the next knock on this worker's port, if one came within the
    listener's time-out; anything but a knock's JSON line is ignored."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return None
    data = b""
    with conn:
        conn.settimeout(2.0)
        try:
            while not data.endswith(b"\n") and len(data) < MAX_KNOCK_BYTES:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if isinstance(message, dict) and type(message.get("worker")) is int:
        return message
    return None
