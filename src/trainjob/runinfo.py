"""What a run folder says about its run, read from its small JSON files only.

``summarize_runs`` reads every run folder under a prefix with one thread pool over all
(run, file) pairs, so hundreds of runs cost a few round trips of wall time, never a
download of weights or logs.
"""

from __future__ import annotations

import calendar
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from trainjob.artifacts import CONFIG, HISTORY, LOCK, MANIFEST, METRICS, STATUS
from trainjob.lock import STALE_SECONDS
from trainjob.storage import Store

log = logging.getLogger(__name__)

# What a summary reads of each run; the manifest only by HEAD (its presence is the news).
SUMMARY_FILES = (STATUS, LOCK, CONFIG, METRICS, HISTORY)


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


def read_files(store: Store, runs: list[str], threads: int = 16
               ) -> dict[str, dict[str, Any]]:
    """For each run, its summary files (None where missing) and whether it has a manifest."""
    jobs = [(run, name) for run in runs for name in (*SUMMARY_FILES, MANIFEST)]

    def read(job: tuple[str, str]) -> Any:
        run, name = job
        key = f"{run}/{name}" if run else name
        if name == MANIFEST:
            return store.exists(key)
        return store.read_json(key)

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
    started = _number(status.get("started")) or _number(lock.get("started"))
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
