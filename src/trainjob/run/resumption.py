"""What a run continues from: the local copy of its folder made to match the store (a new
pod has no local files), the save point picked, ``--overwrite`` removing trainjob's own
entries only, and the status of a run that starts or resumes. Nothing here imports
TensorFlow."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from trainjob.config import Config
from trainjob.errors import ConfigError
from trainjob.run import savepoints
from trainjob.run.folder import BACKUP, LAST, MANIFEST, RUN_ENTRIES, STATUS, RunFolder, read_json
from trainjob.store.base import Store
from trainjob.store.uri import parse_uri

log = logging.getLogger(__name__)


def finished(store: Store, cfg: Config) -> bool:
    """Whether the output already holds a finished run (its manifest) to leave alone."""
    if store.exists(MANIFEST) and not cfg.output.overwrite:
        log.info("%s already holds a finished run (manifest.json); nothing to do. "
                 "Pass --overwrite to train again.", store.uri)
        return True
    return False


def prepare(cfg: Config, run_dir: RunFolder) -> dict | None:
    """Make the local run folder match what the job should continue from; return resume
    state (None: a fresh start). A run whose state is unusable is never deleted: only
    --overwrite starts afresh."""
    store = run_dir.store
    if cfg.output.overwrite:
        log.info("--overwrite: removing the previous run at %s", store.uri)
        run_dir.confirm()
        remove_run(run_dir)
        return None
    if run_dir.remote:  # the bucket is the truth: a new pod has no local files
        clear_local(run_dir.local)
        run_dir.pull()
    if not (run_dir.path(savepoints.STATE).exists() or savepoints.saved_points(run_dir)):
        if run_dir.remote:
            clear_local(run_dir.local)  # a run killed before its first save point
        return None
    state = savepoints.load_state(run_dir) or savepoints.from_last_checkpoint(run_dir)
    if state is None:
        raise ConfigError(
            f"cannot resume {store.uri}: no save point under {BACKUP}/ has intact weights and "
            f"there is no {LAST}; nothing was deleted: inspect it, or pass --overwrite to "
            "start afresh")
    return state


def mark_running(run_dir: RunFolder, state: dict | None) -> None:
    """The status of a run that starts: a resumed one keeps the start of its first attempt
    (``runs list`` shows its whole duration)."""
    now = time.time()
    earlier = (read_json(run_dir.path(STATUS), {}) or {}) if state else {}
    run_dir.set_status("running", error=None, started=now,
                       first_started=earlier.get("first_started") or earlier.get("started") or now,
                       resumed_from_epoch=state["epoch"] if state else None)


def remove_run(run_dir: RunFolder) -> None:
    """Delete trainjob's own entries only: --output may be a bucket root with other data."""
    store = run_dir.store
    if run_dir.uploader.enabled:
        keys = [o.key for name in RUN_ENTRIES
                for o in [*store.list(name + "/"), *filter(None, [store.read_info(name)])]]
        store.delete(keys)
        clear_local(run_dir.local)
    else:
        for name in RUN_ENTRIES:
            path = run_dir.path(name)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def clear_local(path: Path) -> None:
    """Empty a local run folder (a killed uploader's staging folders are its own)."""
    for child in path.iterdir():
        if not child.name.startswith(".staging-"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def local_folder(cfg: Config) -> Path:
    """Where the run folder lives on this host: the output itself when it is local, else
    a folder under --work-dir named by the output URI."""
    scheme, _, key = parse_uri(cfg.output.output)
    if scheme == "file":
        return Path(key).expanduser().absolute()
    digest = hashlib.sha1(cfg.output.output.rstrip("/").encode()).hexdigest()[:16]
    return Path(cfg.runtime.work_dir) / "runs" / digest
