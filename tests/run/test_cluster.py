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

from trainjob.config import ClusterConfig
from trainjob.errors import ClusterError, ConfigError
from trainjob.run.cluster import Cluster, resolve, wait_for_peers


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
    from trainjob.train.trainer import scale_learning_rates

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


def test_barrier_carries_the_chiefs_start_and_the_chief_waits_until_each_worker_took_it():
    """The chief's knock names the save point; the others act on it (here: a fetch that
    takes a while) before they knock on the chief's port, so the chief leaves the barrier
    only after every worker has it."""
    clusters = _pair(free_ports(3))
    record = {"seq": 7, "epoch": 2, "step": 1, "weights_sha256": "ab" * 32,
              "callbacks": {"EarlyStopping:": {"best": 0.5, "wait": 1}}, "pad": "x" * 200_000}
    announced = {"start": "pair", "record": record}  # more than one recv() of the knock
    took: dict[int, float] = {}
    left: dict[int, tuple[float, dict | None]] = {}
    errors: list[BaseException] = []

    def take(index: int):
        def on_announce(message: dict, deadline: float) -> None:
            assert message == {**announced, "worker": 0} and deadline > time.monotonic()
            time.sleep(1.0)  # a download: the chief must still be waiting afterwards
            took[index] = time.monotonic()
        return on_announce

    def worker(cluster: Cluster) -> None:
        try:
            got = wait_for_peers(cluster, timeout=20,
                                 announce=announced if cluster.is_chief else None,
                                 on_announce=None if cluster.is_chief else take(cluster.index))
            left[cluster.index] = (time.monotonic(), got)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clusters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(took) == [1, 2]
    assert left[0][0] >= max(took.values())
    assert left[0][1] == announced
    assert left[1][1] == left[2][1] == {**announced, "worker": 0}


def test_a_worker_that_cannot_take_the_chiefs_start_keeps_the_chief_out():
    chief, other = _pair(free_ports(2))
    failures: list[BaseException] = []

    def cannot(message: dict, deadline: float) -> None:
        raise ClusterError("worker 1: the chief starts from save point 3, but it was not stored")

    def worker() -> None:
        try:
            wait_for_peers(other, timeout=10, on_announce=cannot)
        except ClusterError as exc:
            failures.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    with pytest.raises(ClusterError, match=r"worker 1 \(127\.0\.0\.1:\d+\) did not join"):
        wait_for_peers(chief, timeout=3, announce={"start": "fresh"})
    thread.join(15)
    assert [str(f) for f in failures] == [
        "worker 1: the chief starts from save point 3, but it was not stored"]


def test_barrier_ignores_what_is_not_a_knock():
    chief, other = _pair(free_ports(2))
    port = int(chief.workers[0].rpartition(":")[2])
    result: list[dict | None] = []
    thread = threading.Thread(target=lambda: result.append(
        wait_for_peers(chief, timeout=10, announce={"start": "fresh"})))
    thread.start()
    deadline = time.monotonic() + 10
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b'{"worker": "0"}\n', b"[1]\n"):
        while True:  # until the chief listens
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(junk)
                break
            except OSError:
                assert time.monotonic() < deadline and thread.is_alive(), "the chief never listened"
                time.sleep(0.05)
    assert wait_for_peers(other, timeout=10, on_announce=lambda m, d: None) == \
        {"start": "fresh", "worker": 0}
    thread.join(15)
    assert result == [{"start": "fresh"}]


def test_start_vector_names_both_starts_when_workers_differ():
    from trainjob.run.startpoint import disagreement, named_start, start_vector

    chief = {"seq": 12, "epoch": 2, "step": 2, "weights_sha256": "x"}
    older = {"seq": 11, "epoch": 2, "step": 0, "weights_sha256": "y"}
    digest_a, digest_b = "1f" * 32, "e0" * 32
    same = start_vector(chief, digest_a, 0, 3) + start_vector(chief, digest_a, 1, 3) + \
        start_vector(chief, digest_a, 2, 3)
    assert disagreement(same, 3) is None
    assert named_start(same, 3) == "save point 12 (epoch 2, batch 2), weights 1f1f1f1f1f"
    # The all-reduce divides each worker's vector by its replicas and sums them: a sum of
    # thirds must still name the same digest.
    assert disagreement(sum([same / 3] * 3), 3) is None
    apart = start_vector(chief, digest_a, 0, 2) + start_vector(older, digest_b, 1, 2)
    assert disagreement(apart, 2) == (
        "worker 0 starts from save point 12 (epoch 2, batch 2), weights 1f1f1f1f1f and "
        "worker 1 from save point 11 (epoch 2, batch 0), weights e0e0e0e0e0")
    fresh = start_vector(None, digest_a, 0, 2) + start_vector(
        {"from_checkpoint": "checkpoints/last.weights.h5", "epoch": 3}, digest_a, 1, 2)
    assert disagreement(fresh, 2) == (
        "worker 0 starts from a fresh start, weights 1f1f1f1f1f and worker 1 from "
        "checkpoints/last.weights.h5 (epoch 3), weights 1f1f1f1f1f")
    # Same save point, different weights (a broken load): still a mismatch.
    assert disagreement(start_vector(chief, digest_a, 0, 2) + start_vector(chief, digest_b, 1, 2),
                        2) is not None


@pytest.mark.parametrize("exc, code, words", [
    (MemoryError(), 5, "worker 1: out of memory while training"),
    (type("ResourceExhaustedError", (Exception,), {})("OOM when allocating"), 5,
     "worker 1: out of memory while training"),
    (type("InternalError", (Exception,), {})(
        "Graph execution error:\n\nDetected at node X\nboom"), 5,
     "worker 1: TensorFlow failed while training: boom"),
    (ClusterError("worker 1: a peer worker died"), 4, "worker 1: a peer worker died"),
    # A peer lost outside the guarded collectives (e.g. while variables are broadcast).
    (type("UnavailableError", (Exception,), {})("Graph execution error:\nSocket closed"), 4,
     "worker 1: a peer worker died or stopped responding: UnavailableError: Socket closed;"),
    (type("DeadlineExceededError", (Exception,), {})("timed out"), 4,
     "worker 1: a peer worker died or stopped responding: DeadlineExceededError"),
])
def test_worker_failures_map_to_the_documented_codes(exc, code, words):
    from trainjob.errors import as_job_error

    error = as_job_error(exc, "worker 1: ", peers=True)
    assert error.exit_code == code and str(error).startswith(words), str(error)


def test_a_lone_worker_keeps_peer_errors_as_they_are():
    from trainjob.errors import as_job_error

    unavailable = type("UnavailableError", (Exception,), {})("no peers here")
    assert as_job_error(unavailable) is unavailable


def _announced_pair(weights: bytes, sha: str | None = None) -> dict:
    """A chief's announcement of save point 3, whose weights hold ``weights``."""
    import hashlib

    return {"start": "pair", "record": {
        "seq": 3, "epoch": 1, "step": 2, "weights": "state-000003.weights.h5",
        "weights_sha256": sha or hashlib.sha256(weights).hexdigest()}}


def test_a_worker_waits_for_the_chiefs_save_point_to_be_stored(s3env, s3, bucket, tmp_path,
                                                               caplog):
    """The chief may name a save point the bucket does not show yet: the worker fetches it
    once it is there, checked by its sha256, with the logs it continues."""
    caplog.set_level("INFO", logger="trainjob.run.startpoint")
    from trainjob.run.folder import RunFolder
    from trainjob.run.startpoint import fetch
    from trainjob.store.s3 import S3Store

    weights = b"weights of save point 3"
    announced = _announced_pair(weights)
    s3.client().put_object(Bucket=bucket, Key="runs/x/history.json", Body=b"[]")
    got: list[dict] = []
    with RunFolder(tmp_path / "worker-1", S3Store(bucket, "runs/x"), read_only=True) as run:
        thread = threading.Thread(target=lambda: got.append(
            fetch(announced, run, time.monotonic() + 60, 1)))
        thread.start()
        deadline = time.monotonic() + 30
        while "(it was not stored)" not in caplog.text:  # it looked, and waits
            assert time.monotonic() < deadline and thread.is_alive(), caplog.text
            time.sleep(0.05)
        s3.client().put_object(Bucket=bucket, Key="runs/x/backup/state-000003.weights.h5",
                               Body=weights)
        thread.join(70)
        assert got == [announced["record"]]
        assert (run.local / "backup/state-000003.weights.h5").read_bytes() == weights
        assert (run.local / "history.json").read_text() == "[]"


def test_a_save_point_that_never_matches_its_sha256_is_one_line_and_exit_4(s3env, s3, bucket,
                                                                          tmp_path):
    from trainjob.run.folder import RunFolder
    from trainjob.run.startpoint import fetch
    from trainjob.store.s3 import S3Store

    s3.client().put_object(Bucket=bucket, Key="runs/x/backup/state-000003.weights.h5",
                           Body=b"other weights")
    announced = _announced_pair(b"", sha="ab" * 32)
    with RunFolder(tmp_path / "worker-1", S3Store(bucket, "runs/x"), read_only=True) as run:
        with pytest.raises(ClusterError) as caught:
            fetch(announced, run, time.monotonic() + 2, 1)
    assert caught.value.exit_code == 4
    assert str(caught.value).startswith(
        f"worker 1: the chief starts from save point 3 (epoch 1, batch 2), but s3://{bucket}/"
        "runs/x/backup/state-000003.weights.h5 had sha256 ")
    assert str(caught.value).endswith(", not abababababab by the end of --cluster-timeout; "
                                      "check the bucket, then restart the group")


def test_an_announcement_cannot_name_a_file_outside_the_save_points(s3env, s3, bucket, tmp_path):
    from trainjob.run.folder import RunFolder
    from trainjob.run.startpoint import fetch
    from trainjob.store.s3 import S3Store

    announced = {"start": "pair", "record": {"seq": 3, "weights": "../../../../etc/passwd",
                                             "weights_sha256": "ab" * 32}}
    with RunFolder(tmp_path / "worker-1", S3Store(bucket, "runs/x"), read_only=True) as run:
        with pytest.raises(ClusterError, match="which is not a save point's weights"):
            fetch(announced, run, time.monotonic() + 2, 1)
