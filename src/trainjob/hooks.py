"""Test hooks: behaviour a test sets for the process under test (a hold at a named point of
the run, scripted metrics, fast lock timings, a stand-in backbone with ResNet50's bytes),
read from the JSON file named by TRAINJOB_TEST_HOOKS.

Unset in production, so every hook is inert. Nothing here imports TensorFlow: the lock and
other early code read hooks before training starts.

A *hold* is how a test catches the job in a state whatever the machine's speed: the job
logs ``test hook: holding at <point>`` and waits there, so the test waits for that line
(never for a count of events) and then acts. ``{"hold": {"<point>": SECONDS}}`` waits
SECONDS like a step that does not return (a signal is not noticed meanwhile);
``{"hold": {"<point>": {"seconds": S, "until_signal": true}}}`` ends early once a stop
signal came, so that the signal is handled right at that point, and ``"until_file": PATH``
once the test creates that file. Points: ``first_step``
(before the process's first training step), ``batch:E:S`` (after batch S, counted from 1,
of epoch E), ``epoch:E`` (after epoch E is saved), ``after_training``; in ``dataset pack``,
``pack_stored:N`` (once N shards are stored, before index.json).

``{"collective_error": {"<point>": "<error>"}}`` makes this process's collective at a named
point (``step``: a training step, ``validation``: the all-reduce of the validation figures,
``start``: the check before the first step that all workers start alike) raise that error
instead of running: a TensorFlow error's class name
(``ResourceExhaustedError``, ``UnavailableError``...) or ``MemoryError``. A test gives the
hook to one worker to fail it there.

``{"sample_log": PATH}``: a packed dataset's training stream appends "epoch position id"
for every sample it yields to PATH (``{worker}`` in it: the worker's index), so a test can
compare the samples of a killed and resumed run with those of one never stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from trainjob.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "TRAINJOB_TEST_HOOKS"
POLL_SECONDS = 0.05


def read_hooks() -> dict:
    """The hooks as a dict; {} when TRAINJOB_TEST_HOOKS is unset."""
    path = os.environ.get(ENV)
    if not path:
        return {}
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{ENV}={path}: unreadable test hooks ({exc})") from exc
    return _load(path, st.st_mtime_ns, st.st_size)  # read again only once it changed


@functools.lru_cache(maxsize=8)
def _load(path: str, _mtime_ns: int, _size: int) -> dict:
    try:
        hooks = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{ENV}={path}: unreadable test hooks ({exc})") from exc
    if not isinstance(hooks, dict):
        raise ConfigError(f"{ENV}={path}: test hooks must be a JSON object")
    return hooks


def hold(point: str, signalled: Callable[[], bool] = lambda: False) -> None:
    """Test hook: pause at ``point`` when a test asked for it (see the module's docstring)."""
    spec = read_hooks().get("hold", {}).get(point)
    if spec is None:
        return
    if not isinstance(spec, dict):
        spec = {"seconds": spec}
    seconds, until_signal = float(spec.get("seconds", 0)), bool(spec.get("until_signal"))
    release = Path(spec["until_file"]) if spec.get("until_file") else None
    log.warning("test hook: holding at %s (up to %gs%s%s)", point, seconds,
                ", or until a signal" if until_signal else "",
                f", or until {release} exists" if release else "")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (until_signal and signalled()) or (release is not None and release.exists()):
            return
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def injected_error(point: str) -> str | None:
    """Test hook: the error this process's collective at ``point`` must raise, if any."""
    return read_hooks().get("collective_error", {}).get(point)
