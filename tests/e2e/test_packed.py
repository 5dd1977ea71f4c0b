"""Training from a packed dataset (``trainjob dataset pack``): real `trainjob` processes
against SeaweedFS and a local folder.

The exact-resume tests log every sample id each training stream yields (the ``sample_log``
test hook: "epoch position id"). A job held at a random batch of its second epoch, after
its save point of the batch before is in the bucket, is SIGKILLed and run again; the
samples of that epoch, the killed run's up to the save point then the resumed run's, must
be exactly the uninterrupted run's, in order: none twice, none skipped. The stream runs
ahead of training (tf.data prefetches), so the killed run's log is read up to its save
point's step, which the bucket holds. On one worker and on two.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path

import pytest
import sampledata
from conftest import (
    SMALL,
    SMALL_STAND_IN,
    free_ports,
    make_bucket,
    run_trainjob,
    start_trainjob,
)
from helpers.jobs import hooks_file, stored_json, wait_for

pytestmark = pytest.mark.e2e

BATCH = 8  # SMALL's global batch


@pytest.fixture(scope="module")
def packed(seaweed, tmp_path_factory) -> dict:
    """6 classes x 16 images packed twice: into SeaweedFS and into a local folder."""
    root = tmp_path_factory.mktemp("packsrc") / "classes"
    sampledata.make_class_folders(root, classes=6, per_class=16, background=False)
    bucket = make_bucket(seaweed)
    home = tmp_path_factory.mktemp("packhome")
    local = tmp_path_factory.mktemp("packed") / "local"
    for dest in (f"s3://{bucket}/packed/small/", str(local)):
        result = run_trainjob(["dataset", "pack", str(root), dest, "--seed", "42",
                               "--max-bad-fraction", "0.25"], seaweed.env(), home)
        assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((local / "index.json").read_text())
    return {"bucket": bucket, "s3": f"s3://{bucket}/packed/small/", "local": str(local),
            "index": index, "source": str(root)}


def samples(log: Path) -> dict[int, list[tuple[int, int]]]:
    """epoch -> [(position, id)] as a training stream logged them."""
    out: dict[int, list[tuple[int, int]]] = {}
    for line in log.read_text().splitlines():
        epoch, position, sample = map(int, line.split())
        out.setdefault(epoch, []).append((position, sample))
    return out


def ids(entries: list[tuple[int, int]]) -> list[int]:
    return [sample for _, sample in entries]


def train_args(data: str, out: str, *extra: str) -> list[str]:
    return ["train", "--data", data, "--output", out, "--epochs", "2", "--no-restore-best",
            "--backup-every-steps", "1", *SMALL, *extra]


def kill_mid_epoch(args: list[str], env: dict, home: Path, log: Path, seaweed, bucket: str,
                   prefix: str, batch: int) -> int:
    """Start the job held after ``batch`` of epoch 1; SIGKILL it once the save point of
    the batch before is in the bucket; that step."""
    proc = start_trainjob(args, env, home, log)
    try:
        wait_for(lambda: f"test hook: holding at batch:1:{batch}" in log.read_text(), proc, log)
        wait_for(lambda: (lambda s: (s.get("epoch"), s.get("step")) == (1, batch - 1))(
            stored_json(seaweed, bucket, prefix, "backup/state.json")), proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return batch - 1


def test_one_worker_resumes_mid_epoch_with_the_next_sample(seaweed, packed, tmp_path):
    bucket, index = packed["bucket"], packed["index"]
    train_count = index["counts"]["train"]
    steps = -(-train_count // BATCH)  # the last batch partial, as on the classic path
    batch = random.Random().randint(2, steps - 1)  # the batch the job is killed after
    print(f"killed after batch {batch} of {steps}")

    # The uninterrupted run reads the local folder; the killed one and its rerun SeaweedFS.
    never = tmp_path / "never.log"
    result = run_trainjob(train_args(packed["local"], f"s3://{bucket}/runs/never"),
                          seaweed.env(TRAINJOB_TEST_HOOKS=hooks_file(
                              tmp_path, "never.json", **SMALL_STAND_IN,
                              sample_log=str(never))), tmp_path / "home-never")
    assert result.returncode == 0, result.stderr[-3000:]
    full = samples(never)
    for epoch in (0, 1):  # every training sample once per epoch, at positions 0, 1, ...
        assert [p for p, _ in full[epoch]] == list(range(train_count))
        assert len(set(ids(full[epoch]))) == train_count
    assert ids(full[0]) != ids(full[1])  # each epoch its own order

    killed, resumed = tmp_path / "killed.log", tmp_path / "resumed.log"
    args = train_args(packed["s3"], f"s3://{bucket}/runs/cut")
    home = tmp_path / "home"
    step = kill_mid_epoch(args, seaweed.env(TRAINJOB_TEST_HOOKS=hooks_file(
        tmp_path, "killed.json", **SMALL_STAND_IN, sample_log=str(killed),
        hold={f"batch:1:{batch}": 600})), home, tmp_path / "killed-job.log", seaweed, bucket,
        "runs/cut", batch)
    result = run_trainjob(args, seaweed.env(TRAINJOB_TEST_HOOKS=hooks_file(
        tmp_path, "resumed.json", **SMALL_STAND_IN, sample_log=str(resumed))), home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at epoch 1, batch {step}" in result.stdout
    before, after = samples(killed), samples(resumed)
    assert ids(before[0]) == ids(full[0])  # the same order on every run of the job
    done = step * BATCH
    assert after[1][0][0] == done and 0 not in after  # it starts at the next sample
    assert ids(before[1])[:done] + ids(after[1]) == ids(full[1])  # none twice, none skipped

    config = seaweed.read_json(bucket, "runs/cut/config.json")
    assert config["dataset"]["packed"]["uri"].startswith(packed["s3"].rstrip("/"))
    assert config["dataset"]["splits"] == index["counts"]
    for phase in ("index", "pipeline", "tracing", "first_step"):
        assert phase in config["timings_seconds"], config["timings_seconds"]
    assert not any(k in config["timings_seconds"] for k in ("download", "scan"))
    metrics = seaweed.read_json(bucket, "runs/cut/metrics.json")
    assert metrics["test_images"] == index["counts"]["test"]
    # No full local copy, and nothing of the dataset left behind: the buffer is emptied.
    assert not [p for p in home.rglob("*.tfrecord")]


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _pair(args: list[str], env: dict, hooks: list[str], tmp_path: Path, tag: str,
          procs: list) -> list[tuple[subprocess.Popen, Path]]:
    ports = free_ports(2)
    pair = []
    for i in (0, 1):
        log = tmp_path / f"{tag}-{i}.log"
        proc = start_trainjob(args, {**env, "TF_CONFIG": _tf_config(ports, i),
                                     "TRAINJOB_TEST_HOOKS": hooks[i]},
                              tmp_path / f"home{i}", log)
        procs.append(proc)
        pair.append((proc, log))
    return pair


def _finish(pair) -> None:
    for proc, log in pair:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(1500)
def test_two_workers_read_disjoint_shards_and_resume_mid_epoch_exactly(seaweed, packed,
                                                                        tmp_path, procs):
    bucket, index = packed["bucket"], packed["index"]
    env = seaweed.env()
    train_shards = [s for s in index["shards"] if s["split"] == "train"]
    per_worker = len(train_shards) // 2 * min(s["count"] for s in train_shards)
    steps = per_worker // (BATCH // 2)  # full batches of 4 on each worker
    batch = random.Random().randint(2, steps - 1)
    print(f"killed after batch {batch} of {steps}")

    def hooks(tag: str, **extra) -> list[str]:
        return [hooks_file(tmp_path, f"{tag}{i}.json", **SMALL_STAND_IN,
                           sample_log=str(tmp_path / f"{tag}-samples-{{worker}}.log"),
                           **(extra if i == 0 else {})) for i in (0, 1)]

    never_args = train_args(packed["s3"], f"s3://{bucket}/runs/never2")
    _finish(_pair(never_args, env, hooks("never"), tmp_path, "never", procs))
    full = [samples(tmp_path / f"never-samples-{w}.log") for w in (0, 1)]
    for epoch in (0, 1):
        mine = [set(ids(full[w][epoch])) for w in (0, 1)]
        assert not mine[0] & mine[1]  # disjoint
        assert all(len(ids(full[w][epoch])) == per_worker for w in (0, 1))

    args = train_args(packed["s3"], f"s3://{bucket}/runs/cut2")
    pair = _pair(args, env, hooks("killed", hold={f"batch:1:{batch}": 600}), tmp_path,
                 "killed", procs)
    chief, chief_log = pair[0]
    try:
        wait_for(lambda: f"test hook: holding at batch:1:{batch}" in chief_log.read_text(),
                 chief, chief_log)
        wait_for(lambda: (lambda s: (s.get("epoch"), s.get("step")) == (1, batch - 1))(
            stored_json(seaweed, bucket, "runs/cut2", "backup/state.json")), chief, chief_log)
    finally:
        for proc, _ in pair:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    step = batch - 1

    # One worker cannot continue an epoch two workers split by shards: refused, one line.
    alone = run_trainjob(args, {**env, "TRAINJOB_TEST_HOOKS": hooks("alone")[0]},
                         tmp_path / "home-alone")
    assert alone.returncode == 2, alone.stderr[-3000:]
    errors = [line for line in alone.stderr.splitlines() if line.startswith("trainjob: error")]
    assert len(errors) == 1 and "2 workers" in errors[0] and "epoch 1" in errors[0], errors
    assert "Traceback" not in alone.stderr

    pair = _pair(args, env, hooks("resumed"), tmp_path, "resumed", procs)
    _finish(pair)
    for w in (0, 1):
        assert f"resuming at epoch 1, batch {step}" in pair[w][1].read_text()
        before = samples(tmp_path / f"killed-samples-{w}.log")
        after = samples(tmp_path / f"resumed-samples-{w}.log")
        done = step * BATCH // 2
        assert ids(before[0]) == ids(full[w][0])
        assert after[1][0][0] == done and 0 not in after
        assert ids(before[1])[:done] + ids(after[1]) == ids(full[w][1]), w


def test_bad_packed_data_one_line_and_its_exit_code(seaweed, packed, tmp_path):
    bucket = packed["bucket"]
    client = seaweed.client()
    # A copy of the packed dataset with one training shard damaged, one of another version.
    keys = [k for k in seaweed.keys(bucket, "packed/small/") if not k.endswith("index.json")]
    for prefix in ("damaged", "future"):
        for key in keys:
            client.copy_object(Bucket=bucket, Key=key.replace("small", prefix),
                               CopySource={"Bucket": bucket, "Key": key})
    index = packed["index"]
    victim = next(s["name"] for s in index["shards"] if s["split"] == "train")
    client.put_object(Bucket=bucket, Key=f"packed/damaged/{victim}", Body=b"\0" * 100)
    client.put_object(Bucket=bucket, Key="packed/damaged/index.json",
                      Body=json.dumps(index).encode())
    client.put_object(Bucket=bucket, Key="packed/future/index.json",
                      Body=json.dumps({**index, "version": 99}).encode())
    hooks = hooks_file(tmp_path, **SMALL_STAND_IN)

    cases = [("future", [], 2, "packed format 'trainjob-packed' version 99"),
             ("small", ["--stream-buffer", "3"], 2, "--stream-buffer 3: holds 3 shards"),
             ("damaged", [], 4, f"{victim}: sha256")]
    for name, extra, code, message in cases:
        result = run_trainjob(train_args(f"s3://{bucket}/packed/{name}/",
                                         f"s3://{bucket}/runs/bad-{name}", *extra),
                              seaweed.env(TRAINJOB_TEST_HOOKS=hooks), tmp_path / "home")
        errors = [line for line in result.stderr.splitlines()
                  if line.startswith("trainjob: error")]
        assert result.returncode == code, (name, result.stderr[-3000:])
        assert len(errors) == 1 and message in errors[0], (name, errors)
        assert "Traceback" not in result.stderr
    status = stored_json(seaweed, bucket, "runs/bad-damaged")
    assert status["state"] == "failed" and victim in status["error"]
