"""Resume state under ``backup/``: save points, reading them back, checking them, trimming
the logs to them; and the stop signal. Nothing here imports TF.

A save point is a *pair*: ``backup/state-<seq>.weights.h5`` (weights and optimizer) and
``backup/state-<seq>.json`` (where training stands, callback state, the weights' sha256).
Every save writes a new pair under new names, and ``backup/state.json`` is a copy of the
newest record. Older pairs are deleted only once a newer one is stored, locally and in the
bucket, so a pair broken by a kill or a lost upload falls back to the one before it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from trainjob.errors import ConfigError
from trainjob.run.folder import (
    BACKUP,
    CLASSES,
    CONFIG,
    HISTORY,
    LAST,
    LOG_CSV,
    RunFolder,
    read_json,
    sha256,
    write_json,
)

if TYPE_CHECKING:  # TensorFlow stays unimported until training starts
    import keras

    from trainjob.config import Config
    from trainjob.data.catalog import Dataset


log = logging.getLogger(__name__)


STATE = f"{BACKUP}/state.json"


LEGACY_WEIGHTS = f"{BACKUP}/state.weights.h5"  # the single pair of trainjob <= 0.1


_PAIR = re.compile(r"state-(\d+)\.json$")


KEEP_PAIRS = 2


# Callback attributes Keras resets in on_train_begin and never saves.
CALLBACK_STATE = {
    "EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}


def pair_files(seq: int) -> tuple[str, str]:
    """(weights, record) of save point ``seq``, relative to the run folder."""
    return f"{BACKUP}/state-{seq:06d}.weights.h5", f"{BACKUP}/state-{seq:06d}.json"


def weights_of(record: dict) -> str:
    return f"{BACKUP}/{record['weights']}" if record.get("weights") else LEGACY_WEIGHTS


def write_point(run: RunFolder, seq: int, record: dict,
                write_weights: Callable[[Path], None]) -> dict:
    """Save pair ``seq``: weights first under a new name, then the record that names them.

    A kill at any moment leaves the previous pair whole: nothing is overwritten. Where the
    local folder is the output itself, the run lock is confirmed before the record."""
    weights_rel, record_rel = pair_files(seq)
    weights = run.path(weights_rel)
    weights.parent.mkdir(parents=True, exist_ok=True)
    partial = weights.with_name("partial." + weights.name)
    write_weights(partial)
    os.replace(partial, weights)
    record = {**record, "seq": seq, "weights": Path(weights_rel).name,
              "weights_sha256": sha256(weights)}
    if not run.remote:
        run.confirm()
    write_json(run.path(record_rel), record)
    write_json(run.path(STATE), record)
    return record


def saved_points(run: RunFolder) -> list[int]:
    """Sequence numbers of the records under backup/, oldest first."""
    folder = run.path(BACKUP)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _PAIR.match(p.name)))


def prune_local(run: RunFolder, keep: set[int]) -> None:
    """Delete local pairs not in ``keep`` (and the legacy pair, once a new one exists)."""
    folder = run.path(BACKUP)
    names = [f"{BACKUP}/{p.name}" for p in folder.iterdir()] if folder.is_dir() else []
    for rel in stale_keys(names, keep):
        run.path(rel).unlink(missing_ok=True)


def stale_keys(keys: list[str], keep: set[int]) -> list[str]:
    """Of the files under backup/ (local or in the store), the pair files outside ``keep``."""
    out = []
    for key in keys:
        m = re.match(rf"{BACKUP}/(?:partial\.)?state-(\d+)\.", key)
        if (m and int(m.group(1)) not in keep) or key == LEGACY_WEIGHTS:
            out.append(key)
    return out


def load_state(run: RunFolder) -> dict | None:
    """The newest save point whose weights are intact; older ones if the newest is broken."""
    records = [r for seq in reversed(saved_points(run))
               if (r := read_json(run.path(pair_files(seq)[1])))]
    pointer = read_json(run.path(STATE))
    if pointer and not any(r.get("seq") == pointer.get("seq") for r in records):
        records.insert(0, pointer)  # written by trainjob <= 0.1, or its record is gone
    for record in records:
        weights = run.path(weights_of(record))
        if not weights.is_file():
            why = "its weights file is missing"
        elif sha256(weights) != record.get("weights_sha256"):
            why = "its weights do not match the recorded sha256"
        else:
            return record
        log.warning("resume point at epoch %s step %s is unusable (%s); trying an older one",
                    record.get("epoch"), record.get("step"), why)
    return None


def from_last_checkpoint(run: RunFolder) -> dict | None:
    """With no usable save point: continue from checkpoints/last.weights.h5, if there is
    one, after the epochs history.json records (the optimizer restarts from zero).

    The record carries the settings the run was trained with, so that the resume is checked
    like any other (``check_compatible``); with no record of them, ConfigError."""
    if not run.path(LAST).is_file():
        return None
    history = read_json(run.path(HISTORY), []) or []
    saved, source = recorded_fingerprint(run)
    record = {"epoch": len(history), "step": 0, "from_checkpoint": LAST, "callbacks": {},
              "fingerprint": saved}
    log.warning("no usable resume point: continuing from %s after epoch %d, with a fresh "
                "optimizer state; the settings are checked against %s", LAST, len(history),
                source)
    return record


def recorded_fingerprint(run: RunFolder) -> tuple[dict, str]:
    """(the settings the run started with, where they were found): the newest readable save
    point record (whatever became of its weights), else config.json's fingerprint, else
    what config.json's settings and classes.json tell (a run of an older trainjob)."""
    records = [pair_files(seq)[1] for seq in reversed(saved_points(run))] + [STATE]
    for rel in records:
        record = read_json(run.path(rel))
        if isinstance(record, dict) and record.get("fingerprint"):
            return record["fingerprint"], rel
    config = read_json(run.path(CONFIG))
    if isinstance(config, dict) and config.get("fingerprint"):
        return config["fingerprint"], CONFIG
    if isinstance(config, dict) and isinstance(config.get("settings"), dict):
        return _from_settings(config["settings"], read_json(run.path(CLASSES))), \
            f"{CONFIG}'s settings"
    raise ConfigError(
        f"cannot resume {run.store.uri} from {LAST}: no save point record under {BACKUP}/ and "
        f"no {CONFIG} tell the settings it was trained with, so a changed --seed or split "
        "could not be noticed; nothing was deleted: pass --overwrite to start afresh")


# The settings in a fingerprint, and the group of Config (and of config.json's settings) each
# belongs to; besides them, the class list and the images of each split.
FINGERPRINT_SETTINGS = {"image_size": "model", "optimizer": "optim", "seed": "split",
                        "val_fraction": "split", "test_fraction": "split",
                        "train_per_class": "split", "batch_size": "optim",
                        "steps_per_epoch": "optim", "freeze_backbone_epochs": "optim"}


# The training input's version (train/augment.py): what the image of (seed, epoch, sample)
# is. 1, which records written before it never name, cropped the image once resized to the
# training size, drawn by the sample's position in the epoch; 2 takes the window from the
# original, resizes once, and draws by the sample's id. A run resumes only on its own.
INPUT_PIPELINE = 2
UNRECORDED = {"input_pipeline": 1}  # what a record without the key was made with


def fingerprint(cfg: Config, data: Dataset) -> dict:
    """The settings a resumed run must share with its start: the model, the optimizer and
    everything that decides which images go where, how many batches an epoch has, which
    epochs train the head alone, and what its training images look like. A packed
    dataset's split settings are its own."""
    settings = {key: getattr(getattr(cfg, group), key)
                for key, group in FINGERPRINT_SETTINGS.items()}
    return {"classes": _classes_digest(data.classes), **settings, **data.fixed_split(),
            "samples": data.samples_digest(), "input_pipeline": INPUT_PIPELINE}


def _classes_digest(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def _from_settings(settings: dict, classes: object) -> dict:
    """The part of a fingerprint config.json's settings (and classes.json) can tell: all but
    the images of each split."""
    out = {key: settings[group][key] for key, group in FINGERPRINT_SETTINGS.items()
           if key in settings.get(group, {})}
    if isinstance(classes, dict):
        out["classes"] = _classes_digest([classes[str(i)] for i in range(len(classes))])
    return out


OPTION_NAMES = {"samples": "the dataset's images", "classes": "the class list",
                "input_pipeline": "the input pipeline (this trainjob augments and resizes "
                                  "training images differently from the one that started it)"}


def check_compatible(state: dict, fingerprint: dict) -> None:
    """Exit 2 naming what changed. Settings an older trainjob did not record are not checked,
    but for the input pipeline: a record without it was made by the first one."""
    saved = {**UNRECORDED, **(state.get("fingerprint") or {})}
    changed = sorted(k for k in fingerprint if k in saved and saved[k] != fingerprint[k])
    if changed:
        names = ", ".join(OPTION_NAMES.get(k, "--" + k.replace("_", "-")) for k in changed)
        release = " (and the trainjob release)" if "input_pipeline" in changed else ""
        raise ConfigError(f"cannot resume: {names} changed since the run started; rerun with "
                          f"the original settings{release}, or pass --overwrite to start afresh")


def trim_logs(run: RunFolder, next_epoch: int) -> list[dict]:
    """Keep only epochs before ``next_epoch`` in the CSV and history, so each appears once."""
    history = [h for h in read_json(run.path(HISTORY), []) if h["epoch"] < next_epoch]
    write_json(run.path(HISTORY), history)
    csv_path = run.path(LOG_CSV)
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < next_epoch]
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows(keep if len(keep) > 1 else [])
    return history


def restore_weights(model: keras.Model, run: RunFolder, record: dict) -> int:
    """Load the weights and optimizer state of a save point; returns optimizer iterations.

    Call inside the strategy's scope: the optimizer's slots are built here, and under
    MirroredStrategy they must be mirrored variables like the model's."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(run.path(weights_of(record)))
    model._initial_epoch = None  # a stale value would override fit(initial_epoch=...)
    return int(model.optimizer.iterations.numpy())


def plain(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
