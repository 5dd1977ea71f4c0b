"""What a run folder says about its run, read from its small JSON files only.

``summarize_runs`` reads every run folder under a prefix with one thread pool over all
(run, file) pairs, so hundreds of runs cost a few round trips of wall time, never a
download of weights or logs.
"""

from __future__ import annotations

import calendar
import csv
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from trainjob.errors import ConfigError
from trainjob.run.folder import CLASSES, CONFIG, HISTORY, LOCK, LOG_CSV, MANIFEST, METRICS, STATUS
from trainjob.run.lock import STALE_SECONDS
from trainjob.store.base import Store

log = logging.getLogger(__name__)

# What a summary reads of each run; the manifest only by HEAD (its presence is the news).
SUMMARY_FILES = (STATUS, LOCK, CONFIG, METRICS, HISTORY)
DETAIL_FILES = (*SUMMARY_FILES, CLASSES, LOG_CSV, MANIFEST)
# The settings ``runs show`` prints, as (group, name) in config.json's "settings".
KEY_SETTINGS = (("data", "data"), ("model", "weights"), ("model", "image_size"),
                ("optim", "epochs"), ("optim", "batch_size"), ("optim", "optimizer"),
                ("optim", "learning_rate"), ("optim", "lr_schedule"),
                ("optim", "label_smoothing"), ("optim", "freeze_backbone_epochs"),
                ("split", "seed"), ("split", "val_fraction"), ("split", "test_fraction"),
                ("split", "train_per_class"), ("callbacks", "early_stopping_patience"),
                ("callbacks", "checkpoint_monitor"))
WORST_CLASSES = 5
TOP_CONFUSIONS = 5


@dataclass(frozen=True)
class RunSummary:
    """One row of ``trainjob runs list``."""

    name: str
    uri: str
    status: str  # succeeded | failed | preempted | running | stale | unknown
    finished: bool  # manifest.json is stored
    epochs_done: int | None
    epochs_planned: int | None
    best_val_accuracy: float | None
    test_mean_per_class_accuracy: float | None
    started: float | None  # epoch seconds
    duration_seconds: float | None
    heartbeat_age_seconds: float | None  # only while a lock is held
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_runs(store: Store) -> list[str]:
    """The folders directly under ``store`` (each a candidate run folder)."""
    return store.folders()


def read_files(store: Store, runs: list[str], threads: int = 16,
               names: tuple[str, ...] = (*SUMMARY_FILES, MANIFEST)) -> dict[str, dict[str, Any]]:
    """For each run, the files ``names``: JSON parsed, other files as text, None where
    missing; the manifest only as whether it exists. One pool over all (run, file) pairs."""
    jobs = [(run, name) for run in runs for name in names]

    def read(job: tuple[str, str]) -> Any:
        run, name = job
        key = f"{run}/{name}" if run else name
        if name == MANIFEST:
            return store.exists(key)
        if name.endswith(".json"):
            return store.read_json(key)
        data = store.read_bytes(key)
        return None if data is None else data.decode("utf-8", "replace")

    out: dict[str, dict[str, Any]] = {run: {} for run in runs}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for (run, name), value in zip(jobs, pool.map(read, jobs)):
            out[run][name] = value
    return out


def summarize(name: str, uri: str, files: dict[str, Any],
              now: float | None = None, stale_after: float = STALE_SECONDS) -> RunSummary:
    """The row for one run from its files (see ``read_files``)."""
    now = time.time() if now is None else now
    status = _dict(files.get(STATUS))
    lock = _dict(files.get(LOCK))
    config = _dict(files.get(CONFIG))
    metrics = _dict(files.get(METRICS))
    history = files.get(HISTORY) if isinstance(files.get(HISTORY), list) else []
    finished = bool(files.get(MANIFEST))

    state = str(status.get("state") or ("unknown" if not finished else "succeeded"))
    heartbeat_age = None
    if lock.get("heartbeat") is not None and not finished:
        heartbeat_age = max(0.0, now - float(lock["heartbeat"]))
        if state == "running" and heartbeat_age > stale_after:
            state = "stale"
    # The first attempt's start where the job recorded it (a resumed run), else this one's.
    started = _number(status.get("first_started")) or _number(status.get("started")) or \
        _number(lock.get("started"))
    ended = _number(status.get("finished"))
    if ended is None and state == "running":
        ended = now
    elif ended is None and state == "stale":
        ended = _number(lock.get("heartbeat"))  # its last sign of life
    if ended is None:
        ended = parse_utc(status.get("updated"))
    duration = ended - started if started is not None and ended is not None else None
    planned = config.get("settings", {}).get("optim", {}).get("epochs") \
        if isinstance(config.get("settings"), dict) else None
    val = [row.get("val_accuracy") for row in history if isinstance(row, dict)]
    val = [v for v in val if isinstance(v, (int, float))]
    return RunSummary(
        name=name, uri=uri, status=state, finished=finished,
        epochs_done=status.get("epochs_done", len(history) if history else None),
        epochs_planned=planned,
        best_val_accuracy=max(val) if val else None,
        test_mean_per_class_accuracy=_number(metrics.get("mean_per_class_accuracy")),
        started=started, duration_seconds=duration, heartbeat_age_seconds=heartbeat_age,
        error=status.get("error"),
    )


def summarize_runs(store: Store, threads: int = 16, now: float | None = None
                   ) -> list[RunSummary]:
    """One summary per run folder under ``store``; folders with no run file are left out."""
    runs = find_runs(store)
    files = read_files(store, runs, threads)
    rows = []
    for run in runs:
        got = files[run]
        if not any(got.get(name) for name in (STATUS, LOCK, MANIFEST, CONFIG)):
            log.debug("%s holds no run; skipped", store.child(run))
            continue
        rows.append(summarize(run, store.child(run), got, now))
    return rows


def read_details(store: Store, threads: int = 16, now: float | None = None) -> dict[str, Any]:
    """Everything ``runs show`` prints about the run folder ``store``, as plain data."""
    files = read_files(store, [""], threads, DETAIL_FILES)[""]
    if not any(files.get(name) for name in (STATUS, LOCK, MANIFEST, CONFIG)):
        raise ConfigError(f"{store.uri} holds no run (no status.json, config.json, "
                          "run.lock.json or manifest.json): check the URI; 'trainjob runs "
                          "list' on its parent lists the runs there")
    summary = summarize(store.uri.rstrip("/").rsplit("/", 1)[-1], store.uri, files, now)
    config, metrics = _dict(files.get(CONFIG)), _dict(files.get(METRICS))
    settings = _dict(config.get("settings"))
    log_rows = parse_csv_log(files.get(LOG_CSV))
    per_class = _dict(metrics.get("per_class_accuracy"))
    return {
        "summary": summary.to_dict(),
        "status": _dict(files.get(STATUS)),
        "lock": _dict(files.get(LOCK)) or None,
        "settings": {f"{group}.{name}": _dict(settings.get(group)).get(name)
                     for group, name in KEY_SETTINGS if name in _dict(settings.get(group))},
        "dataset": {k: v for k, v in _dict(config.get("dataset")).items()
                    if k in ("classes", "images", "skipped", "converted_to_rgb", "splits")},
        "trainjob_version": _dict(config.get("versions")).get("trainjob"),
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        "log": log_rows,
        "worst_classes": worst_classes(per_class),
        "confusions": top_confusions(metrics, _dict(files.get(CLASSES))),
    }


def parse_csv_log(text: str | None) -> list[dict[str, Any]]:
    """CSVLogger's rows, numbers as numbers (blank cells as None)."""
    if not text:
        return []
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for key, value in raw.items():
            if key is None:
                continue
            try:
                number = float(value) if value not in ("", None) else None
            except ValueError:
                number = None
            row[key] = int(number) if key == "epoch" and number is not None else number
        rows.append(row)
    return rows


def worst_classes(per_class: dict[str, Any], count: int = WORST_CLASSES
                  ) -> list[tuple[str, float]]:
    """The ``count`` classes with the lowest test accuracy, lowest first (ties by name)."""
    scored = [(name, float(v)) for name, v in per_class.items() if isinstance(v, (int, float))]
    return sorted(scored, key=lambda nv: (nv[1], nv[0]))[:count]


def top_confusions(metrics: dict[str, Any], classes: dict[str, Any],
                   count: int = TOP_CONFUSIONS) -> list[dict[str, Any]] | None:
    """The most frequent (true, predicted) pairs off the diagonal of ``confusion_matrix``
    (rows: true class, in classes.json order); None where metrics.json has no matrix
    (runs of this version record only per-class accuracy)."""
    matrix = metrics.get("confusion_matrix")
    if not isinstance(matrix, list) or not matrix:
        return None
    names = [str(classes.get(str(i), i)) for i in range(len(matrix))]
    pairs = [{"true": names[t], "predicted": names[p], "count": int(n)}
             for t, row in enumerate(matrix) for p, n in enumerate(row)
             if t != p and isinstance(n, (int, float)) and n > 0 and p < len(names)]
    return sorted(pairs, key=lambda c: (-c["count"], c["true"], c["predicted"]))[:count]


def parse_utc(text: object) -> float | None:
    """The run folder's ``%Y-%m-%dT%H:%M:%SZ`` stamps as epoch seconds."""
    if not isinstance(text, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None
