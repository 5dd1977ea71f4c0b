"""TensorBoard event files of a run (``--tensorboard``), written from its epoch records.

Keras' TensorBoard callback appends to a new event file per process, so a run killed after
epoch 3 and resumed from the save point of epoch 2 would hold epoch 3 twice (once from
each process), and the killed process's files would stay in the bucket. Instead, the files
here are a function of ``history.json``, the run's epoch record that resume already trims
to the epochs kept: at every epoch end (and once when training starts or resumes) both
files are rewritten whole from it, under fixed names, and go to the bucket in the same
upload generation as the history and resume state of that epoch. Each epoch's step is
therefore written exactly once, whatever was killed or retried, and the bucket's copy is
replaced, never added to. The cost is a few scalars per epoch, rewritten: nothing.

The layout is the Keras callback's (``train/`` and ``validation/``, tags ``epoch_<metric>``,
step = epoch), so ``tensorboard --logdir <run>/tensorboard`` overlays train and validation
curves. Wall times are those of the rewrite, not of the epoch (``tf.summary`` sets them).
Only TensorFlow writes the files: ``tf.summary.scalar`` needs the ``tensorboard`` package
(an optional extra), so each value is a ``tf.summary.write`` with the metadata of
TensorBoard's scalars plugin, which is what that function writes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from trainjob.run.folder import TENSORBOARD

log = logging.getLogger(__name__)

FILE_NAME = "events.out.tfevents.trainjob.v2"  # TensorBoard reads any *tfevents* file
TRAIN = f"{TENSORBOARD}/train/{FILE_NAME}"
VALIDATION = f"{TENSORBOARD}/validation/{FILE_NAME}"
NOT_SCALARS = ("epoch", "phase", "seconds", "finished_at", "iterations")
SCALARS_PLUGIN = "scalars"


def split_scalars(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One history row as {file: {tag: value}}: ``val_x`` goes to validation as
    ``epoch_x``, every other number to train as ``epoch_<name>``."""
    out: dict[str, dict[str, float]] = {TRAIN: {}, VALIDATION: {}}
    for key, value in row.items():
        if key in NOT_SCALARS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith("val_"):
            out[VALIDATION][f"epoch_{key[4:]}"] = float(value)
        else:
            out[TRAIN][f"epoch_{key}"] = float(value)
    return out


def write_events(history: list[dict[str, Any]], run: Path) -> list[str]:
    """Rewrite the run folder ``run``'s event files from ``history``; returns the files
    written, relative to ``run``. Files of a split with no scalars are removed."""
    import tensorflow as tf
    from tensorflow.core.framework.summary_pb2 import SummaryMetadata

    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=SCALARS_PLUGIN, content=b""))
    per_file: dict[str, list[tuple[int, dict[str, float]]]] = {TRAIN: [], VALIDATION: []}
    for row in history:
        for rel, scalars in split_scalars(row).items():
            if scalars:
                per_file[rel].append((int(row["epoch"]), scalars))
    written = []
    for rel, points in per_file.items():
        dest = run / rel
        if not points:
            dest.unlink(missing_ok=True)
            continue
        staging = dest.parent / ".writing"  # hidden: never published or uploaded
        shutil.rmtree(staging, ignore_errors=True)
        writer = tf.summary.create_file_writer(str(staging))
        with writer.as_default():
            for step, scalars in points:
                for tag, value in sorted(scalars.items()):
                    tf.summary.write(tag, tf.constant(value, tf.float32), step=step,
                                     metadata=metadata)
        writer.close()
        (made,) = staging.glob("events.out.tfevents.*")
        os.replace(made, dest)
        shutil.rmtree(staging, ignore_errors=True)
        written.append(rel)
    log.debug("TensorBoard events of %d epochs written", len(history))
    return written
