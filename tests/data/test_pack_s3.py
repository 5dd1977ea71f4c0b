"""``trainjob dataset pack`` into SeaweedFS, as real processes: the index is stored last,
TensorFlow reads every record as training's scan and split say it must be, and a pack
SIGKILLed midway leaves no process and no index behind, and its rerun reuses what was
stored intact."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import run_trainjob, start_trainjob
from helpers.faultproxy import FaultProxy
from helpers.jobs import hooks_file, wait_for
from helpers.packs import assert_shards_match_index, download, read_records, training_view

from trainjob.config import Config
from trainjob.data.catalog import Dataset
from trainjob.run.savepoints import fingerprint

pytestmark = pytest.mark.e2e

SMALL = ["--max-bad-fraction", "0.25", "--processes", "2", "--threads", "4"]


@pytest.fixture
def zip_in_bucket(seaweed, official_zip) -> tuple[str, str]:
    bucket = f"pack-{uuid.uuid4().hex[:10]}"
    seaweed.client().create_bucket(Bucket=bucket)
    seaweed.client().upload_file(str(official_zip), bucket, "datasets/caltech-101.zip")
    return bucket, f"s3://{bucket}/datasets/caltech-101.zip"


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_official_zip_packed_index_last_and_read_by_tensorflow(
        seaweed, zip_in_bucket, official_zip, tmp_path):
    bucket, uri = zip_in_bucket
    with FaultProxy(seaweed.endpoint) as proxy:
        proxy.hold(rf"^PUT /{bucket}/packed/cal/index\.json$")
        result: dict = {}
        run = threading.Thread(target=lambda: result.update(r=run_trainjob(
            ["dataset", "pack", uri, f"s3://{bucket}/packed/cal/", *SMALL],
            seaweed.env(AWS_ENDPOINT_URL=proxy.endpoint), tmp_path / "home")))
        run.start()
        assert proxy.holding.wait(120), "the index was never sent"
        stored = seaweed.keys(bucket, "packed/cal/")
        shards = sorted(k for k in stored if k.endswith(".tfrecord"))
        assert len(shards) == 18 and "packed/cal/index.json" not in stored
        assert len([k for k in stored if k.startswith("packed/cal/.pack/")]) == 18
        proxy.release()
        run.join(120)
    assert result["r"].returncode == 0, result["r"].stderr
    index = download(seaweed, bucket, "packed/cal", tmp_path / "pack")
    assert_shards_match_index(tmp_path / "pack", index)
    assert index["source"] == uri and index["counts"] == {"train": 39, "val": 6, "test": 6}
    assert len([s for s in index["shards"] if s["split"] == "train"]) == 16

    catalog, splits, expected = training_view(str(official_zip), tmp_path / "cache")
    assert read_records(tmp_path / "pack", index) == expected
    assert index["classes"] == catalog.classes
    cfg = Config.from_options(data=uri, output="unused")
    from_files = fingerprint(cfg, Dataset(catalog, splits, {}))  # what a run on the zip says
    assert index["samples"] == from_files["samples"]


def test_sigkilled_pack_leaves_no_process_and_its_rerun_reuses_what_was_stored(
        seaweed, zip_in_bucket, tmp_path):
    bucket, uri = zip_in_bucket
    dest, prefix = f"s3://{bucket}/packed/k/", "packed/k/"
    args = ["dataset", "pack", uri, dest, *SMALL]
    hooks = hooks_file(tmp_path, hold={"pack_stored:3": 300})
    log = tmp_path / "killed.log"
    proc = start_trainjob(args, seaweed.env(TRAINJOB_TEST_HOOKS=hooks), tmp_path / "home", log)
    try:
        wait_for(lambda: "test hook: holding at pack_stored:3" in log.read_text(), proc, log,
                 120)
        workers = children(proc.pid)
    finally:
        proc.kill()
    proc.wait()  # killed (SIGKILL) in the middle of the pack
    assert len(workers) >= 2  # the pool's processes (and multiprocessing's tracker)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in workers if alive(p)] == [], "processes outlived the killed pack"

    stored = seaweed.keys(bucket, prefix)
    assert prefix + "index.json" not in stored
    recorded = sorted(k[len(prefix) + 6:-5] for k in stored if k.startswith(prefix + ".pack/"))
    assert len(recorded) >= 3
    damaged = recorded[0]
    size = stored[prefix + damaged]
    seaweed.client().put_object(Bucket=bucket, Key=prefix + damaged, Body=b"\0" * size)

    again = run_trainjob(args, seaweed.env(), tmp_path / "home")
    assert again.returncode == 0, again.stderr
    reused = sorted(re.findall(r"\] (\S+): \d+ images, .* \(already stored\)", again.stderr))
    assert reused == [name for name in recorded if name != damaged]
    assert re.search(rf"\] {re.escape(damaged)}: \d+ images, .* \(stored\)", again.stderr)
    index = download(seaweed, bucket, "packed/k", tmp_path / "pack")
    assert_shards_match_index(tmp_path / "pack", index)

    clean = run_trainjob(["dataset", "pack", uri, str(tmp_path / "clean"), *SMALL],
                         seaweed.env(), tmp_path / "home")
    assert clean.returncode == 0, clean.stderr
    reference = json.loads((tmp_path / "clean" / "index.json").read_text())
    assert [(s["name"], s["sha256"]) for s in index["shards"]] == \
        [(s["name"], s["sha256"]) for s in reference["shards"]]
