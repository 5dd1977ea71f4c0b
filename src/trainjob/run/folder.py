"""The run folder: its files, status, manifest and publishing to ``--output``.

Files are written locally first (Keras callbacks can only write local files), then go to
the output store through the ``Uploader``: in generations during training, all at once at
the end. ``manifest.json`` is uploaded last, its presence means the run finished, and after
it nothing in the run folder changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

from trainjob.errors import StorageError
from trainjob.run.uploader import Uploader
from trainjob.store.base import Store, check_inside
from trainjob.store.digests import sha256
from trainjob.store.local import LocalStore

log = logging.getLogger(__name__)


CONFIG = "config.json"


CLASSES = "classes.json"


STATUS = "status.json"


LOG_CSV = "training_log.csv"


HISTORY = "history.json"


PLOT = "history.png"


METRICS = "metrics.json"


CONFUSION = "confusion.png"


PER_CLASS = "per_class.png"


TENSORBOARD = "tensorboard"


MANIFEST = "manifest.json"
TRACKING = "tracking.json"  # the MLflow run of this folder (run.tracking)


LOCK = "run.lock.json"


BEST = "checkpoints/best.weights.h5"


# Where ModelCheckpoint writes a new best; the run state moves it to BEST once the save
# point of its epoch is recorded (a dot name: never uploaded or published).
BEST_STAGED = "checkpoints/.best.staged.weights.h5"


LAST = "checkpoints/last.weights.h5"


MODEL = "model/model.keras"


SAVED_MODEL = "model/saved_model"


BACKUP = "backup"


COPY_ABOVE_BYTES = 1 << 20  # a published duplicate this big is copied in the store
NOT_PUBLISHED = (BACKUP + "/", LOCK, MANIFEST, ".")  # never listed in the manifest


# Everything a run writes at the top of its folder; --overwrite removes only these.
RUN_ENTRIES = (CONFIG, CLASSES, STATUS, LOG_CSV, HISTORY, PLOT, METRICS, CONFUSION, PER_CLASS,
               MANIFEST, TRACKING, BEST.split("/")[0], MODEL.split("/")[0], TENSORBOARD,
               BACKUP)


# What a resumed run needs back from the bucket: never the model, the manifest or the lock,
# and nothing that is not trainjob's (--output may be a bucket root).
RESUME_ENTRIES = (CONFIG, CLASSES, STATUS, LOG_CSV, HISTORY, TRACKING,
                  BEST.split("/")[0] + "/", BACKUP + "/")


def upload_rank(rel: str) -> int:
    """The order of files within an upload generation, so that a kill between any two of
    them leaves a run that resumes right: the resume weights, then the logs that describe
    the save point (a resume trims rows that run ahead, but cannot invent missing ones),
    then the record that makes it the resume point and the pointer to it, then the best
    checkpoint and the rest (never ahead of the resume point), then the status, which
    describes all of it, and the manifest last of all."""
    if rel.startswith(BACKUP + "/"):
        if rel.endswith(".h5"):
            return 0
        return 3 if rel == f"{BACKUP}/state.json" else 2
    if rel in (LOG_CSV, HISTORY) or rel.startswith(TENSORBOARD + "/"):
        return 1
    return {STATUS: 5, MANIFEST: 6}.get(rel, 4)


def decides_the_run(rel: str) -> bool:
    """The files whose write must follow a fresh confirmation of the run lock: the resume
    records, status.json and the manifest (the weights and logs they name go before)."""
    return rel in (STATUS, MANIFEST) or (rel.startswith(BACKUP + "/") and rel.endswith(".json"))


class Lease(Protocol):
    """What a run folder asks before it writes (``lock.RunLock`` is one)."""

    def check(self) -> None: ...
    def ensure_lease(self) -> None: ...
    def confirm(self) -> None: ...
    def write_deadline(self) -> float: ...


class Unlocked:
    """The lease of a run folder that no other job writes (tests, a worker's own copy)."""

    def check(self) -> None:
        pass

    ensure_lease = confirm = check


def write_json(path: Path, obj: Any) -> None:
    """Atomic: readers (and the uploader) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


class RunFolder:
    """The local copy of the run folder and the store it is published to."""

    def __init__(self, local: Path, store: Store, *, sync: bool = True,
                 lease: Lease | None = None, read_only: bool = False) -> None:
        self.local = local
        self.store = store
        local.mkdir(parents=True, exist_ok=True)
        for stale in local.glob(".staging-*"):  # a killed job's; we hold the run lock
            shutil.rmtree(stale, ignore_errors=True)
        # For a local --output the run folder *is* the output: nothing to upload.
        same = isinstance(store, LocalStore) and store.root.resolve() == local.resolve()
        self.lease = lease or Unlocked()  # the run lock: raises once the run is not ours
        self.remote = not same  # the store holds the truth: a resume pulls from it
        # read_only: a worker that is not the chief reads the run and never writes to it.
        self.read_only = read_only
        self.uploader = Uploader(store, local, enabled=self.remote and not read_only,
                                 order=upload_rank, fence=self.lease.ensure_lease,
                                 confirm=self.lease.confirm, critical=decides_the_run,
                                 deadline=lease.write_deadline if lease else None)
        self.sync = sync and not read_only
        self.manifest_sent = False  # manifest.json may be stored: the run must not change
        self.published = False  # manifest.json is stored: the run must not change again

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        # Short: after a flush the thread is idle, and after a failed one (a grace period
        # running out) whatever is in flight is abandoned anyway.
        self.uploader.close(timeout=1.0)

    def path(self, rel: str) -> Path:
        return self.local / rel

    def check(self) -> None:
        """Raise once this job may not write the run. Cheap where the local folder is a copy
        (the uploader checks the lease before each put); where it *is* the output, the
        lease is checked too, since Keras' callbacks write there directly."""
        if self.remote:
            self.lease.check()
        else:
            self.lease.ensure_lease()

    def confirm(self) -> None:
        """Prove the run is still this job's right now (before a delete or a record)."""
        self.lease.confirm()

    def write(self, rel: str, obj: Any, *, upload: bool = True) -> None:
        write_json(self.path(rel), obj)
        if upload:
            self.uploader.submit(rel)

    def set_status(self, state: str, *, upload: bool = True, **fields: Any) -> None:
        if self.manifest_sent:
            return  # the manifest holds this file's hash: it stays as published
        status = read_json(self.path(STATUS), {}) or {}
        status.update(fields, state=state, updated=_utc_now())
        self.write(STATUS, status, upload=upload)

    def mark_stored_status(self, state: str, **fields: Any) -> bool:
        """Set ``state`` on the status.json the store holds, for when the newest files could
        not all be sent (a grace period running out): the uploader stops, and the stored
        status, which describes the newest save point wholly in the store (status goes last
        in every generation), gets the new state. Returns whether it was written; the
        caller bounds the time (a hung store)."""
        if not self.uploader.enabled or self.manifest_sent:
            return False
        if not self.uploader.close(timeout=0.5) and self.uploader.sending == STATUS:
            return False  # that generation's own status is landing: ours could land first
        try:
            self.confirm()  # never written once another job owns the run
            status = self.store.read_json(STATUS) or {}
            status.update(fields, state=state, updated=_utc_now())
            self.store.write_json(STATUS, status)
            return True
        except Exception as exc:  # noqa: BLE001 - the stop in progress matters more
            log.warning("could not mark %s %s: %s", self.store.child(STATUS), state, exc)
            return False

    def pull(self) -> int:
        """Download what a resumed run needs (RESUME_ENTRIES) from the store; returns the
        number of files. Each key is checked to stay inside the local folder."""
        count = 0
        for entry in RESUME_ENTRIES:
            objects = self.store.list(entry) if entry.endswith("/") else \
                [info] if (info := self.store.read_info(entry)) else []
            for obj in objects:
                dest = check_inside(self.local, self.local / obj.key, self.store.child(obj.key))
                self.store.get(obj.key, dest)
                count += 1
        return count

    def published_files(self) -> list[str]:
        """The files a finished run publishes: all but resume state, lock, manifest, temps."""
        out = []
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local).as_posix()
            if path.is_file() and not rel.startswith(NOT_PUBLISHED) and "/." not in rel:
                out.append(rel)
        return out

    def manifest(self, digests: dict[str, str] | None = None) -> dict[str, Any]:
        """Every published file with its size and sha256 (``digests``: known already)."""
        digests = digests or {rel: sha256(self.path(rel)) for rel in self.published_files()}
        files = {rel: {"size": self.path(rel).stat().st_size, "sha256": digest}
                 for rel, digest in digests.items()}
        return {"files": files, "created": _utc_now()}

    def _copies(self, digests: dict[str, str]) -> dict[str, str]:
        """Published files whose bytes another one already has (the last checkpoint is the
        best whenever the last epoch was the best): each is copied inside the store from the
        first of them, not uploaded again."""
        first: dict[str, str] = {}
        copies = {}
        for rel in sorted(digests, key=lambda r: (upload_rank(r), r)):
            if self.path(rel).stat().st_size < COPY_ABOVE_BYTES:
                continue
            if digests[rel] in first:
                copies[rel] = first[digests[rel]]
            else:
                first[digests[rel]] = rel
        return copies

    def publish(self, timeout: float | None = None,
                shield: Callable[[], ContextManager] = contextlib.nullcontext
                ) -> dict[str, Any]:
        """Upload every file, then manifest.json last; then drop the resume state.

        A stop before the manifest leaves no manifest. From the moment it is sent, nothing
        changes the run: ``shield`` keeps a signal from interrupting it, and the status
        stays as the manifest records it, whatever happens next."""
        digests = {rel: sha256(self.path(rel)) for rel in self.published_files()}
        copies = self._copies(digests) if self.uploader.enabled else {}
        self.uploader.commit([rel for rel in digests if rel not in copies], label="final")
        self.flush(timeout)
        if copies:
            self.confirm()
            for rel, source in copies.items():
                self.store.copy(source, rel)
        manifest = self.manifest(digests)
        with shield():
            self.manifest_sent = True
            write_json(self.path(MANIFEST), manifest)
            self.uploader.commit([MANIFEST], label="manifest", force=True)
            self.flush(timeout)
            self.published = True
        self.drop_backup()
        log.info("published %d files to %s (%.1f MB uploaded by this job, %d file(s) copied "
                 "in the store instead)", len(manifest["files"]), self.store.uri,
                 self.uploader.bytes_sent / 1e6, len(copies))
        return manifest

    def flush(self, timeout: float | None) -> None:
        """Everything queued is stored within ``timeout``, or a ``StorageError``."""
        if not self.uploader.flush(timeout):
            raise StorageError(f"uploads to {self.store.uri} did not finish within "
                               f"{timeout:.0f}s: check the store, then rerun to publish")

    def drop_backup(self) -> None:
        """Best effort: the run is published whatever happens here."""
        self.check()
        shutil.rmtree(self.path(BACKUP), ignore_errors=True)
        if not self.uploader.enabled:
            return
        try:
            stale = [o.key for o in self.store.list(BACKUP + "/")]
            if stale:
                self.confirm()
                self.store.delete(stale)
        except StorageError as exc:
            log.warning("could not remove the resume state from %s (%s); it is no longer "
                        "needed and can be deleted by hand", self.store.child(BACKUP), exc)
