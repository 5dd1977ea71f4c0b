"""Epoch-time overhead of continuous sync (background uploads each epoch) against none.

Runs the real job twice against the local S3 server (at nice 19: in production the server
is remote and does not compete for the trainer's CPUs), 64 px, same data and cache:
`--sync` and `--no-sync`. Epoch wall time is the gap between consecutive epoch ends
(history.json `finished_at`), so it includes every callback and the uploader's CPU use;
epoch 0 (graph tracing) and epoch 1 are left out. Both modes write the resume state
locally; only the uploading differs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sampledata  # noqa: E402
from s3server import start_moto, stop_server  # noqa: E402

EPOCHS = 7


def epoch_times(history: list[dict]) -> list[float]:
    ends = [h["finished_at"] for h in history]
    return [b - a for a, b in zip(ends[1:], ends[2:])]


def main() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    # The S3 server stands in for a remote service: in production it does not share the
    # trainer's CPUs, so here it runs at the lowest priority and takes only idle time.
    server = start_moto(work, nice=19)
    try:
        sampledata.make_class_folders(work / "101_ObjectCategories", classes=10,
                                      per_class=30, size=(96, 128))
        archive = sampledata.make_official_zip(work / "caltech-101.zip",
                                               work / "101_ObjectCategories")
        client = server.client()
        client.create_bucket(Bucket="bench")
        client.upload_file(str(archive), "bench", "caltech-101.zip")
        results = {}
        for mode in ("--no-sync", "--sync"):
            cmd = [sys.executable, "-m", "trainjob.cli", "-q", "train",
                   "--data", "s3://bench/caltech-101.zip", "--output", f"s3://bench/{mode[2:]}",
                   "--epochs", str(EPOCHS), "--image-size", "64", "--batch-size", "16",
                   "--early-stopping-patience", "0", mode]
            subprocess.run(cmd, env=server.env(TRAINJOB_HOME=str(work / "home")), check=True,
                           stdout=subprocess.DEVNULL)
            history = server.read_json("bench", f"{mode[2:]}/history.json")
            times = epoch_times(history)
            results[mode[2:]] = {"epoch_seconds": [round(t, 2) for t in times],
                                 "median": statistics.median(times)}
        ratio = results["sync"]["median"] / results["no-sync"]["median"]
        results["overhead_percent"] = round((ratio - 1) * 100, 1)
        print(json.dumps(results, indent=2))
        return results
    finally:
        stop_server(server)
        subprocess.call(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
