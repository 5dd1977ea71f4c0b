"""Where several workers start, and when those that are not the chief may leave.

The chief alone chooses the save point, under the run lock, from what the bucket holds once
the run is its own; it names it over the start-up barrier (``cluster.wait_for_peers``), and
every other worker fetches exactly that one, checked by its sha256. A worker that chose for
itself could read the bucket while the previous chief was still uploading its last save
point, and train from older weights than the chief's. Before the first step, a vector with
each worker's save point and weights digest in its own slots, summed across workers, shows
that all of them start from the same place (``collective.check_start``).

After training, a worker that is not the chief leaves only once the bucket records that
training is finished: a chief restarted after that evaluates and publishes alone, without
peers that would never come back. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np

from trainjob.errors import ClusterError, StorageError
from trainjob.run import savepoints
from trainjob.run.folder import HISTORY, LAST, LOG_CSV, RunFolder
from trainjob.store.base import Store, check_inside
from trainjob.store.digests import sha256

log = logging.getLogger(__name__)

FRESH, PAIR, CHECKPOINT = 0, 1, 2  # the kinds of start
SLOTS = 5  # each worker's slots in the start vector: kind, seq, epoch, batch, weights digest
# Of the weights' sha256: exact in a float64, and still exact after the all-reduce divides
# by a worker's replicas and sums them again (the sum is rounded back).
DIGEST_HEX = 10
POLL_SECONDS = 1.0
_PAIR_WEIGHTS = re.compile(r"state-\d+\.weights\.h5$")


def choice(state: dict | None, run_dir: RunFolder) -> dict:
    """What the chief announces: the record of its save point (which names the weights and
    their sha256), the last-checkpoint fallback with that file's sha256, or a fresh start."""
    if state is None:
        return {"start": "fresh"}
    if state.get("from_checkpoint"):
        return {"start": "checkpoint", "record": state,
                "sha256": sha256(run_dir.path(state["from_checkpoint"]))}
    return {"start": "pair", "record": state}


def describe(state: dict | None) -> str:
    if state is None:
        return "a fresh start"
    if state.get("from_checkpoint"):
        return f"{state['from_checkpoint']} (epoch {state.get('epoch')})"
    return f"save point {state.get('seq', 0)} (epoch {state.get('epoch')}, batch " \
           f"{state.get('step', 0)})"


def fetch(announced: dict, run_dir: RunFolder, deadline: float, index: int) -> dict | None:
    """A worker that is not the chief: put the announced save point in this worker's own
    folder, waiting (until ``deadline``, the start-up barrier's) for the bucket to hold it
    with the announced sha256; returns its record, or None for a fresh start."""
    start = announced.get("start")
    if start == "fresh":
        return None
    record = announced.get("record")
    if start not in ("pair", "checkpoint") or not isinstance(record, dict):
        raise ClusterError(f"worker {index}: the chief announced an unknown start "
                           f"({str(announced)[:200]}); run the same trainjob on every worker")
    key, expected = (LAST, announced.get("sha256")) if start == "checkpoint" else \
        (savepoints.weights_of(record), record.get("weights_sha256"))
    if start == "pair" and key != savepoints.LEGACY_WEIGHTS and \
            not _PAIR_WEIGHTS.match(key.rpartition("/")[2]):
        raise ClusterError(f"worker {index}: the chief named {key!r}, which is not a save "
                           "point's weights; run the same trainjob on every worker")
    waited = False
    while (why := _fetched(run_dir, key, expected)) is not None:
        if not waited:
            log.info("worker %d: waiting for %s (it %s)", index, run_dir.store.child(key), why)
            waited = True
        if time.monotonic() >= deadline:
            raise ClusterError(
                f"worker {index}: the chief starts from {describe(record)}, but "
                f"{run_dir.store.child(key)} {why} by the end of --cluster-timeout; check "
                "the bucket, then restart the group")
        time.sleep(POLL_SECONDS)
    for rel in (HISTORY, LOG_CSV):  # this worker's own logs go on from the chief's
        try:
            if run_dir.store.read_info(rel):
                run_dir.store.get(rel, run_dir.path(rel))
        except StorageError as exc:
            log.warning("worker %d: could not fetch %s (%s); its own log starts afresh",
                        index, rel, exc)
    log.info("worker %d: starting from %s, as the chief named it (sha256 %s)", index,
             describe(record), str(expected)[:12])
    return record


def _fetched(run_dir: RunFolder, key: str, expected: str | None) -> str | None:
    """None once ``key`` is in this worker's folder with sha256 ``expected``; else why not."""
    store = run_dir.store
    dest = check_inside(run_dir.local, run_dir.path(key), store.child(key))
    try:
        if store.read_info(key) is None:
            return "was not stored"
        store.get(key, dest)
    except StorageError as exc:
        return f"could not be read ({exc})"
    got = sha256(dest)
    return None if got == expected else f"had sha256 {got[:12]}, not {str(expected)[:12]}"


def finished(store: Store, index: int | None = None) -> bool:
    """Whether the bucket's resume state says that training is over (logged for worker
    ``index``, which then has nothing to do)."""
    try:
        done = bool((store.read_json(savepoints.STATE) or {}).get("finished_training"))
    except StorageError:
        return False
    if done and index is not None:
        log.info("worker %d: training is finished (%s); the chief evaluates and publishes "
                 "alone", index, store.child(savepoints.STATE))
    return done


def wait_until_finished(store: Store, timeout: float, index: int) -> None:
    """A worker that is not the chief, after training: return once the bucket records that
    training is finished, so that a chief restarted from then on publishes alone (until
    then, it needs this worker to train the rest again)."""
    deadline = time.monotonic() + timeout
    while not finished(store):
        if time.monotonic() >= deadline:
            raise ClusterError(
                f"worker {index}: the chief did not store the end of training "
                f"({store.child(savepoints.STATE)}) within --upload-timeout {timeout:g}s; the "
                "group must restart, and resumes from the last save point")
        time.sleep(POLL_SECONDS)


def start_vector(state: dict | None, digest: str, index: int, size: int) -> np.ndarray:
    """Worker ``index``'s slots (its start and weights digest), zeros elsewhere: summed over
    the workers, every worker's slots."""
    values = np.zeros(SLOTS * size)
    kind = FRESH if state is None else CHECKPOINT if state.get("from_checkpoint") else PAIR
    state = state or {}
    values[SLOTS * index:SLOTS * (index + 1)] = [
        kind, state.get("seq", 0), state.get("epoch", 0), state.get("step", 0),
        int(digest[:DIGEST_HEX], 16)]
    return values


def disagreement(shared: np.ndarray, size: int) -> str | None:
    """None when every worker starts like the chief; else both starts, named."""
    rows = np.rint(np.asarray(shared, np.float64).reshape(size, SLOTS)).astype(np.int64)
    for i in range(1, size):
        if not np.array_equal(rows[i], rows[0]):
            return f"worker 0 starts from {_named(rows[0])} and worker {i} from " \
                   f"{_named(rows[i])}"
    return None


def named_start(shared: np.ndarray, size: int) -> str:
    return _named(np.rint(np.asarray(shared, np.float64).reshape(size, SLOTS)[0]).astype(int))


def _named(row: np.ndarray) -> str:
    kind, seq, epoch, step, digest = (int(v) for v in row)
    where = {FRESH: "a fresh start", CHECKPOINT: f"{LAST} (epoch {epoch})",
             PAIR: f"save point {seq} (epoch {epoch}, batch {step})"}.get(kind, f"kind {kind}")
    return f"{where}, weights {digest:0{DIGEST_HEX}x}"
