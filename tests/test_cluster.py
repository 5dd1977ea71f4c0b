"""The cluster layout (TF_CONFIG or an Indexed Job's variables) and the start-up barrier.

No TensorFlow: these run in `make test-fast`. The trainings with real worker processes are
in test_multiworker.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from conftest import free_ports, run_trainjob
from trainjob.cluster import Cluster, resolve, wait_for_peers
from trainjob.config import ClusterConfig
from trainjob.errors import ClusterError, ConfigError


def test_alone_without_tf_config_or_workers():
    assert resolve(ClusterConfig(), env={}) is None
    one = json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    assert resolve(ClusterConfig(), env={"TF_CONFIG": one}) is None


def test_indexed_job_default_pattern_is_the_pods_dns_names():
    cluster = resolve(ClusterConfig(workers=3), env={"JOB_COMPLETION_INDEX": "2"},
                      hostname="train-x-2")
    assert cluster.workers == ("train-x-0.trainjob-workers:2222",
                               "train-x-1.trainjob-workers:2222",
                               "train-x-2.trainjob-workers:2222")
    assert cluster.index == 2 and not cluster.is_chief
    assert json.loads(cluster.tf_config) == {
        "cluster": {"worker": list(cluster.workers)}, "task": {"type": "worker", "index": 2}}


def test_port_placeholder_gives_each_worker_its_own_port():
    cluster = resolve(ClusterConfig(workers=2, worker_hosts="127.0.0.1:{port}", worker_port=5000),
                      env={"JOB_COMPLETION_INDEX": "0"})
    assert cluster.workers == ("127.0.0.1:5000", "127.0.0.1:5001") and cluster.is_chief


def test_tf_config_takes_precedence_and_puts_the_chief_first():
    spec = {"cluster": {"chief": ["c:1"], "worker": ["w0:1", "w1:1"]},
            "task": {"type": "worker", "index": 1}}
    cluster = resolve(ClusterConfig(workers=5), env={"TF_CONFIG": json.dumps(spec),
                                                     "JOB_COMPLETION_INDEX": "0"})
    assert cluster.workers == ("c:1", "w0:1", "w1:1") and cluster.index == 2
    assert cluster.source == "TF_CONFIG"


@pytest.mark.parametrize("env, cfg, words", [
    ({}, ClusterConfig(workers=2), "needs JOB_COMPLETION_INDEX"),
    ({"JOB_COMPLETION_INDEX": "2"}, ClusterConfig(workers=2), "not a worker index"),
    ({"JOB_COMPLETION_INDEX": "0"}, ClusterConfig(workers=2, worker_hosts="{nope}-{index}"),
     "bad pattern"),
    ({"TF_CONFIG": "{not json"}, ClusterConfig(), "not a valid cluster spec"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"], "ps": ["p:1"]},
                               "task": {"type": "worker", "index": 0}})}, ClusterConfig(),
     "chief and worker tasks only"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                               "task": {"type": "worker", "index": 5}})}, ClusterConfig(),
     "not in its cluster"),
])
def test_bad_layouts_are_config_errors(env, cfg, words):
    with pytest.raises(ConfigError, match=words):
        resolve(cfg, env=env, hostname="h-0")


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="no {index}"):
        ClusterConfig(workers=2, worker_hosts="same-host")
    with pytest.raises(ConfigError, match="must be at least 1"):
        ClusterConfig(workers=0)


def _pair(ports: list[int]) -> list[Cluster]:
    addresses = tuple(f"127.0.0.1:{p}" for p in ports)
    return [Cluster(addresses, i, "test", "{}") for i in range(len(ports))]


def test_barrier_lets_workers_through_whatever_their_start_order():
    clusters = _pair(free_ports(3))
    errors: list[BaseException] = []

    def worker(cluster: Cluster, delay: float) -> None:
        time.sleep(delay)
        try:
            wait_for_peers(cluster, timeout=20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c, d)) for c, d in
               zip(clusters, (0.0, 1.5, 0.5))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert time.monotonic() - started < 10
    # The ports are free again for TensorFlow's server.
    for c in clusters:
        port = int(c.workers[c.index].rpartition(":")[2])
        socket.create_server(("", port)).close()


def test_barrier_times_out_naming_the_missing_worker():
    alone = _pair(free_ports(2))[0]
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"worker 1 \(127\.0\.0\.1:\d+\) did not join "
                                           r"within --cluster-timeout 2s"):
        wait_for_peers(alone, timeout=2)
    assert time.monotonic() - started < 5


def test_barrier_port_held_by_another_process_is_one_retriable_line():
    ports = free_ports(2)
    with socket.create_server(("", ports[0])):
        with pytest.raises(ClusterError, match=rf"worker 0 cannot listen on port {ports[0]} "
                                               r"\(Address already in use\): another process "
                                               r"on this host holds it; .*\(--worker-port\)$"):
            wait_for_peers(_pair(ports)[0], timeout=2)


def test_global_batch_must_divide_among_workers(tmp_path):
    result = run_trainjob(["train", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                           "--workers", "2", "--batch-size", "7"],
                          {"JOB_COMPLETION_INDEX": "0", "PATH": "/usr/bin:/bin"},
                          tmp_path / "home", timeout=60)
    assert result.returncode == 2
    assert result.error_lines() == ["trainjob: error: --batch-size 7 is the global batch: it "
                                    "must divide evenly among the 2 workers"]


def test_linear_lr_scaling_multiplies_both_rates_by_the_replicas():
    from trainjob.config import Config
    from trainjob.training import scale_learning_rates

    cfg = Config.from_options(data="/d", output="/o", learning_rate=0.001,
                              freeze_backbone_epochs=2, lr_scaling="linear")
    scaled = scale_learning_rates(cfg, 4)
    assert scaled.optim.learning_rate == pytest.approx(0.004)
    assert scaled.optim.fine_tune_rate == pytest.approx(0.0004)  # lr / 10, scaled with it
    explicit = Config.from_options(data="/d", output="/o", fine_tune_learning_rate=0.01,
                                   lr_scaling="linear")
    assert scale_learning_rates(explicit, 2).optim.fine_tune_rate == pytest.approx(0.02)
    unscaled = Config.from_options(data="/d", output="/o", learning_rate=0.001)
    assert scale_learning_rates(unscaled, 4).optim.learning_rate == 0.001
