"""Job start to the first training step: the classic path against a packed dataset, as the
dataset grows (1,000, 10,000 and 100,000 images).

What: the real job (``python -m trainjob.cli train``) as a fresh process with a fresh
``TRAINJOB_HOME`` (a cold cache and work folder, like a new pod), timed from its start
(``Popen``) to the log line ``first training step done (tracing X s, ...)``; then it is
killed. Tracing (the train step's Python while TensorFlow builds its graph) is taken out
and reported on its own: it does not depend on the data. The phases of the start come from
the ``timings_seconds`` of the run's local ``config.json`` (written again once the first
step is done): weights, index (one HEAD: is --data packed?), download, unpack, scan, build
(of which pipeline), tracing, first_step; what they leave is the process's start-up,
imports, the run lock and the like. The packed path's ``first_step`` phase includes its
first shuffle window: the first WINDOW (4) training shards, fetched and checked by sha256
before the first batch (``trainjob.data.stream``); the results give its size per N.

The data: small synthetic JPEGs (64-96 px, quality 90, ~4 KB each; ``image_for`` of
``scripts/sampledata.py``) in CLASSES class folders, made by this script, in one
SeaweedFS (``weed mini``, ``start_seaweed``) on loopback:

- classic: the folder as one tar archive, ``s3://bench/classic-N.tar``; the job downloads
  it, unpacks it, scans every image with Pillow, splits and builds its tf.data pipeline.
  An archive is the classic path's fastest form: a prefix of 100,000 objects would time
  the per-object GETs (see the downloads section of docs/benchmarks.md) more than the start.
- packed: ``trainjob dataset pack <folder> s3://bench/packed-N/`` (default shard size,
  ``--shard-size`` to change it); the job reads index.json and streams its shards. The pack
  time is kept as a side figure: it is done once, not at each start.

The model is not the subject: every job runs with the test hook ``stand_in_backbone:
small`` (a tiny backbone instead of ResNet50), 32 px, batch 32, ``--weights none``.
Each N is made, uploaded and packed, then measured: ROUNDS rounds (BIG_ROUNDS from
BIG_SIZE images on), the contenders taking turns (the first alternates), medians.
Beforehand a process that only imports TensorFlow and Keras runs once untimed (so that no
contender pays a cold page cache), then once timed: the floor of the start's "other".
Progress goes to stderr; stdout gets the results' JSON, then one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from s3server import S3Server, start_seaweed, stop_server  # noqa: E402

SIZES = (1000, 10_000, 100_000)
ROUNDS, BIG_ROUNDS, BIG_SIZE = 3, 1, 100_000
CLASSES = 100
SIDES = (64, 96)  # image sides, px, each drawn in this range
BUCKET = "bench"
CONTENDERS = ("classic", "packed")
IMAGE_SIZE, BATCH_SIZE = 32, 32
JOB_TIMEOUT = 3600.0  # seconds to the first step, per job
FIRST_STEP = re.compile(r"first training step done \(tracing ([\d.]+) s, then ([\d.]+) s")
# The phases of config.json that follow each other; "pipeline" is part of "build".
PHASES = ("weights", "index", "download", "unpack", "scan", "build", "tracing", "first_step")


def log(message: str) -> None:
    print(f"[first_step {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the data ----------------------------------------------------------------------------

def _make_part(args: tuple[str, range, int]) -> int:
    from sampledata import image_for

    folder, indices, seed = args
    total = 0
    for i in indices:
        label = i % CLASSES
        h = SIDES[0] + (i * 7919 + seed) % (SIDES[1] - SIDES[0] + 1)
        w = SIDES[0] + (i * 104_729 + seed) % (SIDES[1] - SIDES[0] + 1)
        path = Path(folder) / f"class_{label:03d}" / f"image_{i:06d}.jpg"
        image_for(label, i, (h, w), seed).save(path, quality=90)
        total += path.stat().st_size
    return total


def make_images(folder: Path, count: int, processes: int = 2, seed: int = 0) -> int:
    """``count`` JPEGs in CLASSES class folders; returns their total size in bytes."""
    for label in range(CLASSES):
        (folder / f"class_{label:03d}").mkdir(parents=True, exist_ok=True)
    step = 2000
    parts = [(str(folder), range(lo, min(lo + step, count)), seed)
             for lo in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(_make_part, parts))


def make_tar(folder: Path, archive: Path) -> int:
    """The class folders under one ``dataset/`` folder in an uncompressed tar (JPEGs do not
    compress): what a team would upload for the classic path."""
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="dataset")
    return archive.stat().st_size


def pack(server: S3Server, folder: Path, dest: str, home: Path,
         shard_size: str | None) -> float:
    cmd = [sys.executable, "-m", "trainjob.cli", "dataset", "pack", str(folder), dest]
    if shard_size:
        cmd += ["--shard-size", shard_size]
    env = server.env(PYTHONPATH=str(ROOT / "src"), TRAINJOB_HOME=str(home))
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return took


def packed_stats(server: S3Server, prefix: str) -> dict:
    """What the packed dataset holds, and the first shuffle window a start waits for."""
    from trainjob.data.stream import WINDOW

    raw = server.read(BUCKET, f"{prefix}index.json")
    index = json.loads(raw)
    shards = {split: [s for s in index["shards"] if s["split"] == split]
              for split in ("train", "val", "test")}
    train = shards["train"]
    mean_train = sum(s["bytes"] for s in train) / max(1, len(train))
    return {"index_bytes": len(raw),
            "shards": {split: len(v) for split, v in shards.items()},
            "packed_bytes": sum(s["bytes"] for s in index["shards"]),
            "train_bytes": sum(s["bytes"] for s in train),
            "train_shard_mb": round(mean_train / 1e6, 2),
            # The training stream shuffles within windows of WINDOW shards: the first
            # batch waits for the whole first window (fetched and checked).
            "window_shards": WINDOW,
            "first_window_mb": round(min(WINDOW, len(train)) * mean_train / 1e6, 2)}


# -- one job -----------------------------------------------------------------------------

def local_config(home: Path) -> dict | None:
    """The run's local config.json (the output is on S3: the run folder is under the work
    dir), or None while there is none (or it is being rewritten)."""
    for path in (home / "work" / "runs").glob("*/config.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def time_job(server: S3Server, data: str, output: str, home: Path, hooks: Path,
             timeout: float = JOB_TIMEOUT) -> dict:
    """Start the job, wait for its first training step, kill it. Seconds from the start."""
    cmd = [sys.executable, "-m", "trainjob.cli", "train", "--data", data, "--output", output,
           "--epochs", "1", "--image-size", str(IMAGE_SIZE), "--batch-size",
           str(BATCH_SIZE), "--weights", "none", "--verbose-fit", "line"]
    env = server.env(PYTHONPATH=str(ROOT / "src"), TRAINJOB_HOME=str(home),
                     TRAINJOB_TEST_HOOKS=str(hooks))
    load = os.getloadavg()[0]
    lines: list[str] = []
    found: dict = {}
    seen = threading.Event()
    start = time.perf_counter()
    # The job logs to stdout; TensorFlow's own noise goes to stderr: one pipe for both.
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            if not seen.is_set() and (m := FIRST_STEP.search(line)):
                found.update(at=time.perf_counter(), tracing=float(m[1]), step=float(m[2]))
                seen.set()
            lines.append(line)
            del lines[:-200]
        seen.set()  # the job ended without the line

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        seen.wait(timeout)
        if not found:
            proc.poll()
            raise RuntimeError(
                f"no first step within {timeout:.0f}s (exit {proc.returncode}): "
                f"{' '.join(cmd[2:])}\n{''.join(lines[-60:])}")
        # The chief writes config.json again right after the line: wait for it.
        config, deadline = None, time.monotonic() + 20
        while time.monotonic() < deadline:
            config = local_config(home)
            if config and "first_step" in config.get("timings_seconds", {}):
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
    wall = found["at"] - start
    timings = (config or {}).get("timings_seconds", {})
    phases = {k: timings[k] for k in (*PHASES, "pipeline") if k in timings}
    phases["other"] = round(wall - sum(timings.get(k, 0.0) for k in PHASES), 2)
    tracing = timings.get("tracing", found["tracing"])  # the log line rounds to 0.1 s
    return {"wall_s": round(wall, 2), "tracing_s": tracing,
            "excl_tracing_s": round(wall - tracing, 2), "phases": phases,
            "images": (config or {}).get("dataset", {}).get("images"),
            "load_1min": round(load, 2)}


def import_seconds() -> float:
    """A process that imports TensorFlow and Keras and ends: run once, untimed, so that the
    first contender does not pay a cold page cache, then timed: the floor of "other"."""
    cmd = [sys.executable, "-c", "import tensorflow, keras"]
    subprocess.run(cmd, check=True, capture_output=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def summarize(runs: list[dict]) -> dict:
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    names = sorted({k for r in runs for k in r["phases"]},
                   key=lambda k: ((*PHASES, "pipeline", "other").index(k)))
    phases = {k: round(statistics.median(r["phases"].get(k, 0.0) for r in runs), 2)
              for k in names}
    return {"median_s": med("excl_tracing_s"), "median_wall_s": med("wall_s"),
            "median_tracing_s": med("tracing_s"), "phases": phases, "runs": runs}


# -- the whole benchmark -----------------------------------------------------------------

def machine() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": metadata.version("tensorflow"), "keras": metadata.version("keras"),
            "load_1min_at_start": round(os.getloadavg()[0], 2)}


def measure_size(server: S3Server, count: int, rounds: int, work: Path, hooks: Path,
                 shard_size: str | None) -> tuple[dict, dict]:
    images = work / f"images-{count}"
    start = time.perf_counter()
    total = make_images(images, count)
    made = time.perf_counter() - start
    log(f"{count:,} images, {total / 1e6:.1f} MB, made in {made:.1f}s")
    archive = work / f"classic-{count}.tar"
    archive_bytes = make_tar(images, archive)
    server.client().upload_file(str(archive), BUCKET, archive.name)
    archive.unlink()
    prefix = f"packed-{count}/"
    pack_s = pack(server, images, f"s3://{BUCKET}/{prefix}", work / "pack-home", shard_size)
    shutil.rmtree(work / "pack-home", ignore_errors=True)
    shutil.rmtree(images)
    dataset = {"images": count, "bytes": total, "mean_bytes": round(total / count),
               "make_s": round(made, 1), "archive_bytes": archive_bytes,
               "pack_s": round(pack_s, 1), **packed_stats(server, prefix)}
    log(f"{count:,}: archive {archive_bytes / 1e6:.1f} MB; packed in {pack_s:.1f}s into "
        f"{dataset['shards']} shards")
    uris = {"classic": f"s3://{BUCKET}/{archive.name}", "packed": f"s3://{BUCKET}/{prefix}"}
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for round_ in range(rounds):
        order = CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            home = work / f"home-{name}-{count}-{round_}"
            home.mkdir()
            try:
                run = time_job(server, uris[name],
                               f"s3://{BUCKET}/runs/{name}-{count}-{round_}", home, hooks)
            finally:
                shutil.rmtree(home, ignore_errors=True)
            if run["images"] not in (None, count):
                raise RuntimeError(f"{name}: the job saw {run['images']} images, not {count}")
            log(f"{count:,} {name} round {round_ + 1}/{rounds}: {run['wall_s']}s to the first "
                f"step, tracing {run['tracing_s']}s, phases {run['phases']}")
            runs[name].append(run)
    client = server.client()  # the next size needs the disk more than the server needs these
    for key in [*server.keys(BUCKET, prefix), archive.name]:
        client.delete_object(Bucket=BUCKET, Key=key)
    return dataset, {name: summarize(v) for name, v in runs.items()}


def main(sizes: tuple[int, ...] = SIZES, rounds: int = ROUNDS, big_rounds: int = BIG_ROUNDS,
         shard_size: str | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-first-step-"))
    hooks = work / "hooks.json"
    # The model is not the subject: a tiny stand-in backbone instead of ResNet50.
    hooks.write_text(json.dumps({"stand_in_backbone": "small"}))
    began = time.perf_counter()
    server = start_seaweed(work, buckets=(BUCKET,))
    try:
        info = {**machine(), "import_tf_s": round(import_seconds(), 2)}
        datasets, results, loads = {}, {}, []
        for count in sizes:
            n_rounds = big_rounds if count >= BIG_SIZE else rounds
            datasets[str(count)], results[str(count)] = measure_size(
                server, count, n_rounds, work, hooks, shard_size)
            loads += [r["load_1min"] for c in results[str(count)].values() for r in c["runs"]]
        first, last = str(sizes[0]), str(sizes[-1])
        ratio = {n: round(r["classic"]["median_s"] / r["packed"]["median_s"], 2)
                 for n, r in results.items()}
        growth = {c: round(results[last][c]["median_s"] / results[first][c]["median_s"], 2)
                  for c in CONTENDERS}
        out = {"sizes": list(sizes), "rounds": rounds, "big_rounds": big_rounds,
               "big_size": BIG_SIZE, "classes": CLASSES, "sides_px": list(SIDES),
               "image_size": IMAGE_SIZE, "batch_size": BATCH_SIZE,
               "shard_size": shard_size or "default (128MiB)",
               "backbone": "stand_in_backbone: small (test hook)",
               "datasets": datasets, "results": results, "ratio": ratio, "growth": growth,
               "machine": {**info, "load_1min_at_runs": loads},
               "total_s": round(time.perf_counter() - began, 1)}
        print(json.dumps(out, indent=2))
        print("RESULT first_step: start to first step, tracing excluded, "
              + "; ".join(f"{int(n):,} images classic {r['classic']['median_s']}s / packed "
                          f"{r['packed']['median_s']}s = {ratio[n]}x"
                          for n, r in results.items())
              + f"; growth {first}->{last}: classic {growth['classic']}x, "
              f"packed {growth['packed']}x")
        return out
    finally:
        stop_server(server, grace=0)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="dataset sizes, images, comma-separated (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"rounds below {BIG_SIZE} images (default: %(default)s)")
    parser.add_argument("--big-rounds", type=int, default=BIG_ROUNDS,
                        help=f"rounds from {BIG_SIZE} images on (default: %(default)s)")
    parser.add_argument("--shard-size", default=None,
                        help="`dataset pack --shard-size` (default: pack's own default)")
    args = parser.parse_args()
    main(tuple(int(s) for s in args.sizes.split(",")), args.rounds, args.big_rounds,
         args.shard_size)
