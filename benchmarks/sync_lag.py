"""How far the bucket falls behind when epochs are much faster than uploads.

A GPU finishes a Caltech101 epoch in seconds while its resume pair (ResNet50 with Adam:
~283 MB) takes longer than that to upload. This drives the run-state layer with a synthetic
training loop (no TensorFlow: any loop can drive it) whose epochs are ``SPEEDUP`` times
faster than one generation's upload through a throttled link to the local S3 server, and
samples the bucket's status.json meanwhile.

Contenders, side by side in one run:
- ``generations``: trainjob's uploader (whole generations, skipping to the newest);
- ``per-file queue``: the uploader of trainjob 0.1.0, loaded from git history, where a
  newer version of a file replaced the queued one and moved it to the end of the queue.

Reported: the bucket's lag over time, as the age of the epoch it shows (the time since that
epoch ended locally) in units of one generation's upload time; its maximum (target: at
most 2); and the longest time one epoch's bookkeeping blocked the training loop.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy  # noqa: E402
from s3server import start_moto, stop_moto  # noqa: E402

from trainjob.run.folder import RunFolder  # noqa: E402
from trainjob.run.state import RunState  # noqa: E402
from trainjob.run.stop import StopSignal
from trainjob.store.client import _clients
from trainjob.store.s3 import S3Store  # noqa: E402

MB = 1024**2
PAIR_MB = 48  # the resume pair, scaled down from 283 MB to keep the run short
LINK_MB_S = 16  # the throttled link: one generation takes ~3 s
SPEEDUP = 6  # epochs this many times faster than one generation's upload
EPOCHS = 36
BASELINE_COMMIT = "4c45818"  # trainjob 0.1.0's artifacts.py, with the per-file queue


def sample_lag(server, bucket: str, prefix: str, local: list[float], stop: threading.Event,
               out: list[tuple[float, int]]) -> None:
    """Every 0.25 s: (time, epochs done per the bucket's status.json)."""
    client = server.client()
    while not stop.is_set():
        try:
            body = client.get_object(Bucket=bucket, Key=f"{prefix}/status.json")["Body"].read()
            stored = json.loads(body).get("epochs_done", 0)
        except Exception:  # noqa: BLE001 - not there yet
            stored = 0
        out.append((time.monotonic(), stored))
        stop.wait(0.25)


def drive_generations(run: RunFolder, epoch_s: float, local: list[float]) -> list[float]:
    """Returns, per epoch, the seconds the loop waited beyond writing its own weights."""
    state = RunState(run, fingerprint={}, history=[], stop=StopSignal())
    waited = []
    for epoch in range(EPOCHS):
        time.sleep(epoch_s)  # the epoch's compute
        writing = [0.0]

        def write_weights(path: Path) -> None:
            t = time.monotonic()
            path.write_bytes(os.urandom(PAIR_MB * MB))
            writing[0] = time.monotonic() - t

        t = time.monotonic()
        state.end_epoch(epoch, {"epoch": epoch}, write_weights=write_weights, iterations=epoch,
                        callbacks={})
        waited.append(time.monotonic() - t - writing[0])
        local.append(time.monotonic())  # local[k]: when epoch k-1 ended
    return waited


def drive_per_file_queue(old, run_root: Path, store, epoch_s: float,
                         local: list[float]) -> list[float]:
    """0.1.0's order of work per epoch: weights, state, then status, each submitted."""
    uploader = old.Uploader(store, run_root)
    blocked = []
    try:
        for epoch in range(EPOCHS):
            time.sleep(epoch_s)
            (run_root / "backup").mkdir(exist_ok=True)
            (run_root / "backup/state.weights.h5").write_bytes(os.urandom(PAIR_MB * MB))
            t = time.monotonic()
            old.write_json(run_root / "backup/state.json", {"epoch": epoch + 1})
            old.write_json(run_root / "status.json", {"epochs_done": epoch + 1})
            uploader.submit("backup/state.weights.h5", "backup/state.json", "status.json")
            blocked.append(time.monotonic() - t)
            local.append(time.monotonic())
    finally:
        uploader.close()
    return blocked


def load_baseline(work: Path):
    """trainjob 0.1.0's artifacts module, from git history; None outside a git checkout."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show",
                                 f"{BASELINE_COMMIT}:src/trainjob/artifacts.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = work / "artifacts_0_1_0.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("artifacts_0_1_0", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(name: str, server, proxy: FaultProxy, work: Path, epoch_s: float, old) -> dict:
    bucket, prefix = "bench", name.replace(" ", "-")
    os.environ.update({k: v for k, v in server.env(AWS_ENDPOINT_URL=proxy.endpoint).items()
                       if k.startswith("AWS_")})
    _clients.clear()
    store = S3Store(bucket, prefix, threads=4)
    started = time.monotonic()
    local, samples, stop = [started], [], threading.Event()
    sampler = threading.Thread(target=sample_lag,
                               args=(server, bucket, prefix, local, stop, samples), daemon=True)
    sampler.start()
    root = work / prefix
    root.mkdir()
    if old is None:
        with RunFolder(root, store) as run:
            blocked = drive_generations(run, epoch_s, local)
            skipped = run.uploader.skipped
    else:
        blocked, skipped = drive_per_file_queue(old, root, store, epoch_s, local), None
    train_s = time.monotonic() - started
    stop.set()
    sampler.join()
    return {"train_seconds": round(train_s, 1), "samples": samples, "local": local,
            "started": started, "max_blocked_seconds": round(max(blocked), 3),
            "skipped_generations": skipped}


def summarize(run: dict, upload_s: float) -> dict:
    """Lag = the age of what the bucket shows (since the end of its epoch, or since the start
    before anything arrived), while training ran, in generations of ``upload_s`` seconds."""
    started, local = run.pop("started"), run.pop("local")
    samples = run.pop("samples")
    ages = [(t - started, (t - local[min(stored, len(local) - 1)]) / upload_s)
            for t, stored in samples if t - started <= run["train_seconds"]]
    epoch_period = statistics.median(b - a for a, b in zip(local[1:], local[2:]))
    run.update(max_lag_generations=round(max(a for _, a in ages), 2),
               # The uploader's bound: the epoch in the bucket was the newest when its upload
               # began, and it stays there while the next one uploads: two uploads, plus at
               # most one epoch between the end of that epoch and the start of its upload.
               bound_generations=round(2 + epoch_period / upload_s, 2),
               median_lag_generations=round(statistics.median(a for _, a in ages), 2),
               bucket_epochs_at_end_of_training=samples[-1][1] if samples else 0,
               lag_over_time=[(round(t, 1), round(a, 2)) for t, a in ages[::6]])
    return run


def generation_seconds(samples: list[tuple[float, int]]) -> float:
    """The real upload time of one generation: the median gap between the bucket's updates
    (the link was never idle: epochs were always waiting)."""
    changes = [t for (t, s), (_, prev) in zip(samples[1:], samples) if s != prev]
    return statistics.median(b - a for a, b in zip(changes, changes[1:]))


def main() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-lag-"))
    server = start_moto(work, nice=19)  # stands in for a remote store: idle CPU only
    try:
        server.client().create_bucket(Bucket="bench")
        upload_s = PAIR_MB / LINK_MB_S
        epoch_s = upload_s / SPEEDUP
        results = {"pair_mb": PAIR_MB, "link_mb_per_s": LINK_MB_S, "epochs": EPOCHS,
                   "generation_upload_seconds": round(upload_s, 2),
                   "epoch_seconds": round(epoch_s, 2)}
        with FaultProxy(server.endpoint, bytes_per_second=LINK_MB_S * MB) as proxy:
            gen = measure("generations", server, proxy, work, epoch_s, None)
            old = load_baseline(work)
            base = measure("per-file queue", server, proxy, work, epoch_s, old) if old else None
        # Lag is counted in real generation upload times (the server's own speed on a busy
        # machine adds to the link's), the same unit for both contenders.
        results["measured_generation_upload_seconds"] = real = round(
            generation_seconds(gen["samples"]), 2)
        results["generations"] = summarize(gen, real)
        results["per-file queue"] = summarize(base, real) if base else None
        print(json.dumps({k: v for k, v in results.items()}, indent=1))
        gen = results["generations"]
        print(f"RESULT sync_lag max_lag_generations={gen['max_lag_generations']} "
              f"max_wait_s={gen['max_blocked_seconds']} baseline_max_lag_generations="
              f"{(results['per-file queue'] or {}).get('max_lag_generations')}")
        return results
    finally:
        stop_moto(server)
        subprocess.call(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
