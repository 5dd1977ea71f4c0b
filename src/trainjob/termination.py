"""The termination message: one short line saying how the job ended, for Kubernetes.

Kubernetes copies the file at a container's ``terminationMessagePath`` (default
``/dev/termination-log``, which the kubelet mounts into the container) into the pod's
status, where ``kubectl describe pod`` and ``kubectl get pod -o jsonpath=...`` show it,
and truncates it at 4096 bytes. The line names the exit code, the one-line reason and the
run folder, e.g. ``preempted (exit 143): stopped by signal in epoch 2 after batch 4; run
s3://bucket/runs/r1``.

``TRAINJOB_TERMINATION_LOG`` names the file (empty: none); without it the job writes
``/dev/termination-log`` only where that file already exists and is writable, so nothing is
ever created in /dev on a workstation. It is an environment variable rather than an option
because it is read on every exit, a usage error included, before or without any parsing.
"""

from __future__ import annotations

import logging
import os
import re
import threading

from trainjob.errors import (
    ConfigError,
    DataError,
    LostOwnership,
    Preempted,
    StorageError,
    TrainingError,
)
from trainjob.store.client import redact

log = logging.getLogger(__name__)

ENV = "TRAINJOB_TERMINATION_LOG"
DEFAULT_PATH = "/dev/termination-log"  # Kubernetes' default terminationMessagePath
LIMIT_BYTES = 4096  # the kubelet keeps at most this much of the message
LOCK_WAIT_SECONDS = 2.0  # a writer stuck in another thread never blocks the exit
NAMES = {
    0: "succeeded",
    1: "failed",
    ConfigError.exit_code: "usage error",
    DataError.exit_code: "data error",
    StorageError.exit_code: "storage or cluster error",  # ClusterError shares exit 4
    TrainingError.exit_code: "training error",
    LostOwnership.exit_code: "lost ownership",
    130: "aborted",
    Preempted.exit_code: "preempted",
}
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>]+")

_lock = threading.Lock()
_run_uri: str | None = None


def record_run(uri: str | None) -> None:
    """Remember the run folder's URI, named by every later message (None forgets it)."""
    global _run_uri
    _run_uri = uri


def message(exit_code: int, reason: str, run: str | None = None) -> str:
    """The text written: name and code, the reason, the run; one line, URLs redacted, at
    most LIMIT_BYTES of UTF-8 (the reason is shortened first, so the run stays named)."""
    head = f"{NAMES.get(exit_code, 'failed')} (exit {exit_code})"
    reason = _URL.sub(lambda m: redact(m.group(0)), " ".join(str(reason).split()))
    tail = ""
    if run:
        tail = f"run {redact(' '.join(run.split()))}" + (" published" if exit_code == 0 else "")
    fixed = len(f"{head}: ; {tail}".encode())
    room = LIMIT_BYTES - fixed
    if len(reason.encode()) > room:
        reason = reason.encode()[:max(0, room - 3)].decode("utf-8", "ignore") + "..."
    parts = [p for p in (reason, tail) if p]
    text = head + (": " + "; ".join(parts) if parts else "")
    return text.encode()[:LIMIT_BYTES].decode("utf-8", "ignore")


def destination() -> tuple[str, bool] | None:
    """(path, may create it), or None when there is nowhere to write."""
    named = os.environ.get(ENV)
    if named is not None:
        return (named, True) if named.strip() else None
    if os.path.isfile(DEFAULT_PATH) and os.access(DEFAULT_PATH, os.W_OK):
        return DEFAULT_PATH, False
    return None


def write(exit_code: int, reason: str) -> None:
    """Write the message for this exit; never raises, safe from any thread, last call wins."""
    try:
        target = destination()
        if target is None:
            return
        path, create = target
        data = message(exit_code, reason, _run_uri).encode()
        locked = _lock.acquire(timeout=LOCK_WAIT_SECONDS)
        try:
            # Truncate and write in place: the kubelet's file is a bind mount, which a
            # rename could not replace.
            flags = os.O_WRONLY | os.O_TRUNC | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        finally:
            if locked:
                _lock.release()
    except Exception as exc:  # noqa: BLE001 - on the way out, a failure here must not mask the exit
        log.debug("termination message not written: %s", exc)
