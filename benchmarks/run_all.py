"""Run every benchmark and write docs/benchmarks.md. Not a test: numbers, not pass/fail."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"
sys.path.insert(0, str(HERE))

import input_pipeline  # noqa: E402
import sync_lag  # noqa: E402
import sync_overhead  # noqa: E402


def lag_section(lag: dict) -> str:
    gen, old = lag["generations"], lag["per-file queue"]
    rows = [f"| generations (trainjob) | {gen['max_lag_generations']} | "
            f"{gen['median_lag_generations']} | {gen['max_blocked_seconds']} | "
            f"{gen['skipped_generations']} |"]
    if old:
        rows.append(f"| per-file queue (0.1.0) | {old['max_lag_generations']} | "
                    f"{old['median_lag_generations']} | {old['max_blocked_seconds']} | - |")
    ratio = (f"The per-file queue's bucket fell {old['max_lag_generations'] / max(gen['max_lag_generations'], 1e-9):.1f}x "
             "further behind." if old else "The 0.1.0 baseline needs git history; it was skipped.")
    return f"""## Sync lag when epochs are faster than uploads

A synthetic training loop drives the run-state layer (`benchmarks/sync_lag.py`): a
{lag['pair_mb']} MB resume pair per epoch through a {lag['link_mb_per_s']} MB/s link to the local S3
server, so one generation takes {lag['generation_upload_seconds']} s on the link
({lag['measured_generation_upload_seconds']} s measured, the server's own time included) while an epoch
computes for {lag['epoch_seconds']} s and writes its pair ({lag['epochs']} epochs). Lag is the age of the
epoch the bucket's status.json shows (the time since that epoch ended), in units of one
measured generation upload, sampled every 0.25 s while training runs. The uploader's bound
is two uploads plus one epoch ({lag['generations']['bound_generations']} here: the epoch the bucket shows was the
newest when its upload began, and stays while the next one uploads). Target: at most about
2, and the loop never waits for the network (the wait column excludes writing its own pair).

| uploader | max lag (generations) | median lag | longest wait of the loop (s) | generations skipped |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

{ratio} Lag over time (seconds since start, lag), generations:
`{gen['lag_over_time']}`
"""


def previous_results() -> dict:
    """The raw results embedded in docs/benchmarks.md by the last run."""
    text = DOC.read_text() if DOC.exists() else ""
    block = text.split("```json", 1)[1].split("```", 1)[0] if "```json" in text else "{}"
    return json.loads(block)


def main(only: list[str]) -> None:
    """Run the benchmarks named in ``only`` (all when empty); the others keep the figures of
    their last run, so one benchmark can be refreshed without the rest."""
    runners = {"input_pipeline": input_pipeline.main, "sync_overhead": sync_overhead.main,
               "sync_lag": sync_lag.main}
    results = previous_results()
    for name, runner in runners.items():
        if not only or name in only:
            results[name] = runner()
    pipe, sync, lag = (results[name] for name in runners)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    text = f"""# Benchmarks

Written {time.strftime('%Y-%m-%d')} on {machine}, CPU only, by `make bench`
(`benchmarks/run_all.py [NAME...]`; a name reruns one benchmark and keeps the others'
figures). Each compares its contenders side by side in one run.

## Input pipeline: tf.data against ImageDataGenerator

{pipe['images']} JPEGs of 300x240, resized to {pipe['image_size']} px, batch {pipe['batch_size']}, flip + zoom
augmentation in both (`benchmarks/input_pipeline.py`).

| pass | tf.data (img/s) | ImageDataGenerator (img/s) | ratio |
| --- | --- | --- | --- |
| 1 (decode every file) | {pipe['tf_data_images_per_s'][0]} | {pipe['image_data_generator_images_per_s'][0]} | {pipe['speedup_pass1']}x |
| 2 (tf.data serves its cache) | {pipe['tf_data_images_per_s'][1]} | {pipe['image_data_generator_images_per_s'][1]} | {pipe['speedup_pass2']}x |

## Continuous sync overhead

The real job, 64 px, 10 classes x 30 images, {sync_overhead.EPOCHS} epochs, against the local S3
server (`benchmarks/sync_overhead.py`). Epoch time is the gap between consecutive epoch ends,
epochs 2 and later (epoch 0 traces the graph). Each epoch uploads the CSV, history, status,
both checkpoints and the resume state (ResNet50 weights with Adam state: ~283 MB each).

| mode | median epoch (s) | epochs (s) |
| --- | --- | --- |
| `--no-sync` | {sync['no-sync']['median']:.2f} | {sync['no-sync']['epoch_seconds']} |
| `--sync` | {sync['sync']['median']:.2f} | {sync['sync']['epoch_seconds']} |

Overhead of sync: **{sync['overhead_percent']}%** (target: at most 5%).

{lag_section(lag)}

Raw results:

```json
{json.dumps(results, indent=2)}
```
"""
    DOC.write_text(text)
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main(sys.argv[1:])
