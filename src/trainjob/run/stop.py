"""The stop signal: SIGTERM and SIGINT, the grace period, and the watchdog that keeps it."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

from trainjob.errors import Preempted

log = logging.getLogger(__name__)
if TYPE_CHECKING:  # TensorFlow stays unimported until training starts

    pass


SIGNALS = (signal.SIGTERM, signal.SIGINT)


# Of the grace period, what the watchdog's own stop needs (marking the stored status, 2 s;
# releasing the lock, 1 s; exiting a second early): it starts when this much is left.
WATCHDOG_RESERVE_SECONDS = 4.5


# The process is gone this long before the grace period ends, whatever its shutdown is doing:
# a starved machine (the suite at a load of 7 on 2 cores) delayed the last steps by 2 s.
EXIT_MARGIN_SECONDS = 1.0


class StopSignal:
    """SIGTERM/SIGINT: the first asks training to stop at the next batch end (outside
    training it raises at once), the second exits.

    With several workers (``collective`` set), a signal is only *signalled* here: the
    training loop shares it with the group, and every worker stops (``requested``) after
    the same step, through ``agree``.

    Python runs signal handlers in the main thread between bytecodes, so a main thread
    inside a step that does not return (the first trace of a large model, XLA, a collective
    whose peer hung) would hear of a signal only after the Kubernetes grace period. So a
    watchdog thread hears every signal at once (``signal.set_wakeup_fd``): a second signal
    exits at once, and if the main thread has not begun its own shutdown when only
    WATCHDOG_RESERVE_SECONDS of the grace period are left, the watchdog stops the run
    itself (``emergency``: the stored status marked preempted, the lock released) and exits
    143. Whoever begins the shutdown first owns it (``claim_shutdown``)."""

    def __init__(self, grace: float = 25.0) -> None:
        self.grace = grace
        self.signalled_at: float | None = None
        self.requested_at: float | None = None
        self.signal_name = "SIGTERM"
        self.in_training = False
        self.collective = False
        self.shielded = False  # publishing the manifest: a signal must not interrupt it
        self.exit_code = Preempted.exit_code  # the watchdog's; 0 once the run is published
        # Run by the watchdog when the main thread did not stop in time (set by the job once
        # it has a run folder and a lock); ``on_exit(code, reason)`` just before it exits.
        self.emergency: Callable[[str], None] | None = None
        self.on_exit: Callable[[int, str], None] = lambda code, reason: None
        self._mutex = threading.Lock()
        self._shutdown = threading.Lock()  # held by whoever runs the shutdown
        self._heard = {"handler": 0, "watchdog": 0}  # signals each side has seen
        self._watchdog: threading.Thread | None = None

    def install(self) -> None:
        """Take SIGTERM and SIGINT (again: TensorFlow's coordination service installs a
        handler of its own), and start the watchdog once. Call from the main thread."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        if self._watchdog is None:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._sockets = (reader, writer)  # kept open for the process's life
            self._watchdog = threading.Thread(target=self._watch, args=(reader,),
                                              name="trainjob-signals", daemon=True)
            self._watchdog.start()

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self._heard_one(signum, "handler"):
            self._exit_now("stopped by a second signal")
        if not self.in_training and not self.shielded:
            raise Preempted(f"stopped by {self.signal_name} outside training")

    def _heard_one(self, signum: int, side: str) -> bool:
        """Record a signal seen by ``side``; False when that side has now seen two."""
        with self._mutex:
            self._heard[side] += 1
            if self._heard[side] > 1:
                return False
            first = self.signalled_at is None
            if first:
                self.signalled_at = time.monotonic()
                self.signal_name = signal.Signals(signum).name
                if not self.collective:
                    self.requested_at = self.signalled_at
        if first:
            log.warning("%s received: stopping after the current batch (grace period %gs)",
                        self.signal_name, self.grace)
        return True

    def _watch(self, reader: socket.socket) -> None:
        deadline: float | None = None
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._stop_in_time()
                return
            ready, _, _ = select.select([reader], [], [], wait)
            for signum in reader.recv(64) if ready else b"":
                if signum not in SIGNALS:
                    continue
                if not self._heard_one(signum, "watchdog"):
                    self._exit_now("stopped by a second signal")
                if deadline is None:
                    deadline = self.signalled_at + self.grace - WATCHDOG_RESERVE_SECONDS

    def _stop_in_time(self) -> None:
        """The grace period is nearly over: stop the run here if the main thread has not
        begun to; else give its (bounded) shutdown until the end of the grace period."""
        end = self.signalled_at + self.grace - EXIT_MARGIN_SECONDS
        if self._shutdown.acquire(blocking=False):
            reason = (f"stopped by {self.signal_name}: the grace period ran out while a step "
                      "or a collective had not returned; the store keeps the newest save "
                      "point wholly stored")
            log.warning("%s", reason)
            if self.emergency is not None:
                worker = threading.Thread(target=self.emergency, args=(reason,),
                                          name="trainjob-emergency", daemon=True)
                worker.start()
                worker.join(max(0.0, end - time.monotonic()))
            self._exit_now(reason)
        time.sleep(max(0.0, end - time.monotonic()))
        self._exit_now(f"stopped by {self.signal_name}: the shutdown outlasted the grace "
                       "period")

    def _exit_now(self, reason: str) -> None:
        """Leave at once, from any thread: whatever is in flight is abandoned."""
        code = self.exit_code
        try:
            self.on_exit(code, reason)
            if code:
                sys.stderr.write(f"trainjob: error: {reason}\n")
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    def claim_shutdown(self) -> bool:
        """The main thread begins its shutdown; False if the watchdog already has (the
        process is about to exit: the caller must not write anything more)."""
        return self._shutdown.acquire(blocking=False)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """A signal does not interrupt what runs inside (storing the manifest: once it is
        sent, the run is finished), and the watchdog does not stop the run meanwhile."""
        self._shutdown.acquire(blocking=False)
        self.shielded = True
        try:
            yield
        finally:
            self.shielded = False

    def agree(self, why: str) -> None:
        """Stop with the rest of the group, after this step."""
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            log.warning("%s: stopping after this batch", why)

    def end_collective(self) -> None:
        """Training with the group is over: a signal this worker got now stops it alone."""
        self.collective = False
        if self.signalled_at is not None and self.requested_at is None:
            self.requested_at = self.signalled_at

    @property
    def signalled(self) -> bool:
        return self.signalled_at is not None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def remaining(self, grace: float | None = None) -> float:
        """Seconds left of the grace period (all of it while no signal came)."""
        grace = self.grace if grace is None else grace
        start = self.signalled_at if self.signalled_at is not None else self.requested_at
        if start is None:
            return grace
        return max(0.0, grace - (time.monotonic() - start))
