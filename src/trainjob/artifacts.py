"""The run folder: status, history, plot, manifest; its upload to ``--output``.

Files are written locally first (Keras callbacks can only write local files), then go to
the output store through ``Uploader``: continuously during training, all at once at the end.
``manifest.json`` is uploaded last, and its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from trainjob.errors import StorageError
from trainjob.storage import LocalStore, Store

log = logging.getLogger(__name__)

CONFIG = "config.json"
CLASSES = "classes.json"
STATUS = "status.json"
LOG_CSV = "training_log.csv"
HISTORY = "history.json"
PLOT = "history.png"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
LOCK = "run.lock.json"
BEST = "checkpoints/best.weights.h5"
LAST = "checkpoints/last.weights.h5"
MODEL = "model/model.keras"
BACKUP = "backup"
NOT_PUBLISHED = (BACKUP + "/", LOCK, MANIFEST, ".")  # never listed in the manifest
# Everything a run writes at the top of its folder; --overwrite removes only these.
RUN_ENTRIES = (CONFIG, CLASSES, STATUS, LOG_CSV, HISTORY, PLOT, METRICS, MANIFEST,
               BEST.split("/")[0], MODEL.split("/")[0], BACKUP)


# Files trainjob itself only ever replaces whole (write, then rename): the uploader may
# snapshot them with a hard link instead of a copy. Keras rewrites its files in place.
ATOMIC_PREFIXES = (BACKUP + "/",)
UPLOAD_NICE = 10


def _snapshot(path: Path, snap: Path, replaced_whole: bool) -> None:
    if replaced_whole:
        try:
            os.link(path, snap)  # free: the writer's next version is a new inode
            return
        except OSError:
            pass
    shutil.copyfile(path, snap)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: readers (and the uploader) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Uploader:
    """One background thread that mirrors changed run-folder files to the output store.

    A newer version of a file replaces a queued older one; failed uploads are retried with
    backoff. Training only waits when more than ``max_pending_bytes`` are queued, and in
    ``flush``. Files are snapshotted at submit time, so Keras may rewrite them meanwhile.
    """

    def __init__(self, store: Store, root: Path, *, enabled: bool = True, retries: int = 5,
                 backoff: float = 1.0, max_pending_bytes: int = 4 * 1024**3) -> None:
        self.store, self.root, self.enabled = store, root, enabled
        self.retries, self.backoff, self.max_pending = retries, backoff, max_pending_bytes
        self.staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        self._pending: dict[str, tuple[Path, int]] = {}  # rel -> (snapshot, size), in order
        self._uploaded: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) last sent
        self._queued: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) of the snapshot
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._seq = 0
        self.error: StorageError | None = None
        self.uploads = 0
        self._thread = threading.Thread(target=self._run, name="trainjob-uploader", daemon=True)
        self._thread.start()

    def submit(self, *rels: str, force: bool = False) -> None:
        """Queue files (paths relative to the run folder) whose content changed."""
        if not self.enabled:
            return
        for rel in rels:
            path = self.root / rel
            if not path.is_file():
                continue
            st = path.stat()
            if not force and self._uploaded.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            with self._cond:
                self._cond.wait_for(lambda: self._pending_bytes() < self.max_pending
                                    or self._closed)
                self._seq += 1
                snap = self.staging / f"{self._seq}-{path.name}"
                _snapshot(path, snap, rel.startswith(ATOMIC_PREFIXES) or rel.endswith(".json"))
                old = self._pending.pop(rel, None)
                if old:
                    old[0].unlink(missing_ok=True)
                self._pending[rel] = (snap, st.st_size)
                self._uploaded.pop(rel, None)
                self._queued[rel] = (st.st_size, st.st_mtime_ns)
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is uploaded. Raises the upload error, if any."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            done = self._cond.wait_for(lambda: (not self._pending and not self._busy)
                                       or self.error is not None,
                                       None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self.error:
            raise self.error
        return bool(done)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        shutil.rmtree(self.staging, ignore_errors=True)

    def _pending_bytes(self) -> int:
        return sum(size for _, size in self._pending.values())

    def _run(self) -> None:
        # Below the trainer's threads: uploads fill idle CPU time instead of taking it from
        # training. Linux applies nice per thread, and the transfer threads boto3 starts
        # from this one inherit it.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           max(os.getpriority(os.PRIO_PROCESS, 0), UPLOAD_NICE))
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                rel = next(iter(self._pending))
                snap, _ = self._pending.pop(rel)
                self._busy = True
            try:
                self._upload(snap, rel)
            except Exception as exc:  # noqa: BLE001 - a dead thread would make flush() hang
                if not isinstance(exc, StorageError):
                    exc = StorageError(f"upload of {rel} to {self.store.uri} failed: {exc}")
                log.error("upload of %s failed after retries: %s", rel, exc)
                self.error = exc
            finally:
                snap.unlink(missing_ok=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, snap: Path, rel: str) -> None:
        # Once a file has failed all its retries the store is presumed down: the rest get
        # one try each, so the job reports the failure promptly instead of retrying forever.
        retries = 0 if self.error else self.retries
        for attempt in range(retries + 1):
            try:
                self.store.put(snap, rel)
                with self._cond:
                    self.uploads += 1
                    if rel not in self._pending:  # no newer version queued meanwhile
                        self._uploaded[rel] = self._queued[rel]
                return
            except StorageError as exc:
                if attempt == retries:
                    raise
                delay = self.backoff * 2**attempt
                log.warning("upload of %s failed (%s); retrying in %.0fs", rel, exc, delay)
                time.sleep(delay)


class RunFolder:
    """The local copy of the run folder and the store it is published to."""

    def __init__(self, local: Path, store: Store, *, sync: bool = True) -> None:
        self.local = local
        self.store = store
        local.mkdir(parents=True, exist_ok=True)
        # For a local --output the run folder *is* the output: nothing to upload.
        same = isinstance(store, LocalStore) and store.root.resolve() == local.resolve()
        self.uploader = Uploader(store, local, enabled=not same)
        self.sync = sync

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uploader.close()

    def path(self, rel: str) -> Path:
        return self.local / rel

    def write(self, rel: str, obj: Any, *, upload: bool = True) -> None:
        write_json(self.path(rel), obj)
        if upload:
            self.uploader.submit(rel)

    def set_status(self, state: str, *, upload: bool = True, **fields: Any) -> None:
        status = read_json(self.path(STATUS), {}) or {}
        status.update(fields, state=state, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime()))
        self.write(STATUS, status, upload=upload)

    def sync_epoch(self, *extra: str) -> None:
        """Queue what changed this epoch, status.json last; sent in the background."""
        if self.sync:
            self.uploader.submit(LOG_CSV, HISTORY, BEST, LAST, *extra, STATUS)

    def published_files(self) -> list[str]:
        """The files a finished run publishes: all but resume state, lock, manifest, temps."""
        out = []
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local).as_posix()
            if path.is_file() and not rel.startswith(NOT_PUBLISHED) and "/." not in rel:
                out.append(rel)
        return out

    def manifest(self) -> dict[str, Any]:
        files = {rel: {"size": self.path(rel).stat().st_size, "sha256": sha256(self.path(rel))}
                 for rel in self.published_files()}
        return {"files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def publish(self) -> dict[str, Any]:
        """Upload every file, then manifest.json last; then drop the resume state."""
        self.uploader.submit(*self.published_files())
        self.uploader.flush()
        manifest = self.manifest()
        write_json(self.path(MANIFEST), manifest)
        self.uploader.submit(MANIFEST, force=True)
        self.uploader.flush()
        self.drop_backup()
        log.info("published %d files to %s", len(manifest["files"]), self.store.uri)
        return manifest

    def drop_backup(self) -> None:
        shutil.rmtree(self.path(BACKUP), ignore_errors=True)
        if self.uploader.enabled:
            stale = [o.key for o in self.store.list(BACKUP + "/")]
            if stale:
                self.store.delete(stale)


def plot_history(history: list[dict[str, Any]], out: Path) -> None:
    """Loss and accuracy curves, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            points = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
