"""Run every benchmark and write docs/benchmarks.md. Not a test: numbers, not pass/fail."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import input_pipeline  # noqa: E402
import sync_overhead  # noqa: E402


def main() -> None:
    pipe = input_pipeline.main()
    sync = sync_overhead.main()
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    text = f"""# Benchmarks

Measured {time.strftime('%Y-%m-%d')} on {machine}, CPU only, by `make bench`
(`benchmarks/run_all.py`). Each compares two variants side by side in one run.

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

Raw results:

```json
{json.dumps({'input_pipeline': pipe, 'sync_overhead': sync}, indent=2)}
```
"""
    (HERE.parent / "docs" / "benchmarks.md").write_text(text)
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
