"""MLflow tracking of a run folder (the optional ``mlflow`` extra): one MLflow run per run
folder, continued by every resumed job, each epoch logged once.

``tracking.json`` in the run folder keeps a random run key and, once known, the MLflow run
id; it goes to the bucket with the run, so a new pod continues the same MLflow run (one
lost between its creation and the storing of its id is found again by its key, a tag).

Tracking never fails or slows training: the public methods return at once and never raise.
One daemon thread holds *what is still to send*, not a queue of requests: a failure leaves
it in place for the next try (capped backoff), an outage is one warning, ``close`` waits a
bounded time, and the run folder stays the record. Exactly once per epoch: an epoch is sent
once its save point is stored (``confirm``), so a resume never redoes an epoch MLflow shows
and MLflow's values are ``history.json``'s; and steps the MLflow run holds are never sent
again (a fallback to an older save point).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from trainjob import __version__
from trainjob.config import Config
from trainjob.errors import ConfigError
from trainjob.run.folder import CONFUSION, METRICS, PER_CLASS, PLOT, TRACKING, RunFolder, read_json
from trainjob.run.state import RunState

log = logging.getLogger(__name__)

STEP_KEY = "loss"  # in every history row: its steps are the epochs the MLflow run holds
NOT_METRICS = frozenset({"epoch", "finished_at", "iterations"})
STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
# The client's own retries (7, backoff up to 120 s) and time-out (120 s) would hold the
# thread for minutes per request; this module retries by itself. A user's env still wins.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
              "MLFLOW_CONFIGURE_LOGGING": "false"}
MAX_METRICS = 1000  # per log_batch request (the client would split larger ones: not atomic)
PARAM_LIMIT = 6000  # MLflow's longest param value (the server truncates longer ones)
TAG_LIMIT = 8000
REMOTE_ARTIFACTS = ("mlflow-artifacts", "http", "https", "s3", "gs", "wasbs", "abfss", "hdfs",
                    "dbfs")


ENV = "MLFLOW_TRACKING_URI"
CLOSE_SECONDS = 15.0  # at the end of a run, for the last sends (the grace period: less)


def start(cfg: Config, run_dir: RunFolder) -> Tracker | None:
    """The run's tracker, or None when tracking is off (no --mlflow-tracking-uri and no
    MLFLOW_TRACKING_URI). Asked for without the mlflow extra: exit 2 for the option, one
    warning for the variable alone (set for other tools, it must not stop the job)."""
    uri = cfg.tracking.mlflow_tracking_uri or os.environ.get(ENV)
    if not uri:
        return None
    if importlib.util.find_spec("mlflow") is None:
        if cfg.tracking.mlflow_tracking_uri:
            raise ConfigError("--mlflow-tracking-uri needs MLflow's client: pip install "
                              "'trainjob[mlflow]' (the image has it), or leave the option out")
        log.warning("%s is set but MLflow's client is not installed (pip install "
                    "'trainjob[mlflow]'): this run is not tracked", ENV)
        return None
    settings = cfg.to_dict()
    settings.pop("tracking", None)
    tags = {"trainjob.run_folder": cfg.output.output, "trainjob.version": __version__,
            **({"trainjob.image": os.environ["TRAINJOB_IMAGE"]}
               if os.environ.get("TRAINJOB_IMAGE") else {}),
            **({"trainjob.trial": str(cfg.trial.index)} if cfg.trial else {})}
    name = cfg.output.output.rstrip("/").rsplit("/", 1)[-1] or cfg.output.output
    log.info("MLflow: tracking to %s, experiment %s", redact(uri), cfg.tracking.mlflow_experiment)
    return Tracker(uri, cfg.tracking.mlflow_experiment, run_dir.local, run_name=name,
                   params=flatten(settings), tags=tags, on_record=run_dir.uploader.submit)


def redact(uri: str) -> str:
    """The tracking URI without user:password@ or a query (tokens): safe to store."""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("http"):
        return uri
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """config.json's "settings" as MLflow params: ``group.name`` -> its value as text."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{prefix}{key}"] = text[:PARAM_LIMIT]
    return out


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a history row (the epoch is the step, not a metric)."""
    return {k: float(v) for k, v in row.items() if k not in NOT_METRICS
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """Mirrors a run folder into one MLflow run, in the background."""

    def __init__(self, uri: str, experiment: str, folder: Path, *, run_name: str,
                 params: Mapping[str, str], tags: Mapping[str, str],
                 on_record: Callable[[str], None] = lambda rel: None,
                 backoff_cap: float = 60.0) -> None:
        for name, value in CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        self.uri, self.experiment, self.folder = uri, experiment, folder
        self.run_name, self.backoff_cap, self.on_record = run_name, backoff_cap, on_record
        self.record: dict[str, Any] = read_json(folder / TRACKING, {}) or {}
        if not self.record.get("run_key"):  # stored before the run exists: see _find_run
            self.record = {"run_key": uuid.uuid4().hex, "run_id": None, "experiment_id": None}
        self.record.update(tracking_uri=redact(uri), experiment=experiment)
        self._write_record()
        self._cond = threading.Condition()
        self._params = dict(params)
        self._tags = {**tags, "trainjob.run_key": self.record["run_key"]}
        self._epochs: dict[int, Mapping[str, Any]] = {}  # rows not sent yet
        self._confirmed = -1  # epochs up to this one have their save point stored
        self._final: dict[str, tuple[float, int]] = {}  # key -> (value, timestamp ms)
        self._artifacts: dict[str, str | None] = {}  # local path -> artifact folder
        self._status: str | None = None
        self._run_id: str | None = None  # set once connected (in this process)
        self._done: set[int] = set()  # steps the MLflow run holds
        self._local_artifacts = False  # the artifact root is a path on the server's disk
        self._closing = self._finished = self._failing = False
        self._thread = threading.Thread(target=self._loop, name="trainjob-mlflow", daemon=True)
        self._thread.start()

    # --- the job's side: each returns at once --------------------------------------------

    def log_history(self, history: list[Mapping[str, Any]]) -> list[str]:
        """The run state's epoch writer: every row it holds (new ones are sent once their
        save point is stored); returns no file of the run folder's."""
        with self._cond:
            for row in history:
                if int(row["epoch"]) not in self._done:
                    self._epochs[int(row["epoch"])] = dict(row)
            self._cond.notify_all()
        return []

    def confirm(self, epoch: int) -> None:
        """Epochs up to ``epoch`` are stored with their save point (sent from now on)."""
        with self._cond:
            self._confirmed = max(self._confirmed, epoch)
            self._cond.notify_all()

    def log_final(self, metrics: Mapping[str, Any], artifacts: Iterable[Path]) -> None:
        """The test metrics (metrics.json's numbers, as ``test_*``) and the run's pictures."""
        now = int(time.time() * 1000)  # fixed: a request resent is then a no-op
        with self._cond:
            self._final.update({f"test_{k}": (v, now) for k, v in row_metrics(metrics).items()})
            self._artifacts.update({str(p): None for p in artifacts if Path(p).exists()})
            self._cond.notify_all()

    def follow(self, state: RunState) -> None:
        """Track ``state``'s epochs: the history it resumes with (stored already), then each
        epoch once the run state says its save point is stored."""
        state.stored_listeners.append(self.confirm)
        state.add_epoch_writer(self.log_history)
        self.confirm(len(state.history) - 1)

    def finish(self, run_dir: RunFolder) -> None:
        """The run is published: its test metrics and pictures, then status FINISHED."""
        with self._cond:  # published: every epoch of the history is stored
            self._confirmed = max([self._confirmed, *self._epochs])
        metrics = read_json(run_dir.path(METRICS), {}) or {}
        self.log_final(metrics, [run_dir.path(rel) for rel in (METRICS, PLOT, CONFUSION,
                                                                 PER_CLASS)])
        self.close("FINISHED", CLOSE_SECONDS)

    def close(self, status: str | None, timeout: float) -> bool:
        """Set the run's final status (None: leave it, the run is another job's now) and wait
        at most ``timeout`` s for everything to be sent; what is left is dropped with a
        warning (the run folder keeps it)."""
        assert status is None or status in STATUSES, status
        deadline = time.monotonic() + timeout
        with self._cond:
            self._status, self._closing = status, True
            self._cond.notify_all()
            while not self._finished and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            left_over = self._pending()
        if left_over:
            log.warning("MLflow: gave up sending %s to %s (the run folder keeps them)",
                        ", ".join(left_over), redact(self.uri))
        return not left_over

    # --- the thread ----------------------------------------------------------------------

    def _work(self) -> bool:
        return self._run_id is None or bool(self._params or self._tags or self._final or
                                            self._artifacts or self._status or self._sendable())

    def _sendable(self) -> list[int]:
        return sorted(e for e in self._epochs if e not in self._done and e <= self._confirmed)

    def _loop(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._work() or self._closing)
                if not self._work():
                    break
            try:
                self._sync()
                if self._failing:
                    log.info("MLflow: %s is reachable again", redact(self.uri))
                self._failing, delay = False, 1.0
            except Exception as exc:  # noqa: BLE001 - tracking never fails the job
                if not self._failing:
                    log.warning("MLflow: %s unreachable (%s); retrying in the background",
                                redact(self.uri), _short(exc))
                self._failing = True
                with self._cond:
                    if self._closing:  # one try after close() is all: no backoff then
                        break
                    self._cond.wait(delay)
                delay = min(2 * delay, self.backoff_cap)
        with self._cond:
            self._finished = True
            self._cond.notify_all()  # close() waits for this

    def _sync(self) -> None:
        """Send what is pending, in order; each part leaves the state once it is stored."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        client = MlflowClient(tracking_uri=self.uri)
        if self._run_id is None:
            self._connect(client)
        run_id = self._run_id
        with self._cond:
            params, tags = dict(self._params), dict(self._tags)
        if params or tags:
            self._refusable(lambda: client.log_batch(
                run_id, params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, str(v)[:TAG_LIMIT]) for k, v in tags.items()]),
                "params and tags")
            with self._cond:
                _drop(self._params, params)
                _drop(self._tags, tags)
        with self._cond:
            rows = [self._epochs[e] for e in self._sendable()]
        for chunk in _chunks(rows, MAX_METRICS):  # whole epochs per request: all or none
            # The row's own time stamp: a request resent after its answer was lost matches
            # the stored points exactly, and the store ignores it.
            metrics = [Metric(k, v, int(r.get("finished_at", time.time()) * 1000),
                              int(r["epoch"])) for r in chunk for k, v in row_metrics(r).items()]
            self._refusable(lambda: client.log_batch(run_id, metrics=metrics),
                            f"epochs {chunk[0]['epoch']}..{chunk[-1]['epoch']}")
            with self._cond:
                for row in chunk:
                    self._done.add(int(row["epoch"]))
                    self._epochs.pop(int(row["epoch"]), None)
        with self._cond:
            final, artifacts = dict(self._final), dict(self._artifacts)
        if final:
            self._refusable(lambda: client.log_batch(run_id, metrics=[
                Metric(k, v, ts, 0) for k, (v, ts) in final.items()]), "test metrics")
            with self._cond:
                _drop(self._final, final)
        for path, folder in artifacts.items():
            if not self._local_artifacts:
                self._refusable(lambda: client.log_artifact(run_id, path, folder), path)
            with self._cond:
                self._artifacts.pop(path, None)
        with self._cond:
            status = self._status if self._closing else None
        if status:
            client.set_terminated(run_id, status)
            with self._cond:
                self._status = None

    def _connect(self, client: Any) -> None:
        """Find or create the experiment and the run; reopen it; read what it holds."""
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                client.create_experiment(self.experiment)
            except MlflowException as exc:  # another job created it meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            exp = client.get_experiment_by_name(self.experiment)
        run = self._find_run(client, exp.experiment_id)
        if run is None:  # never created (a timed-out create is found by its key next time)
            run = client.create_run(exp.experiment_id, run_name=self.run_name,
                                    tags={"trainjob.run_key": self.record["run_key"]})
        run_id = run.info.run_id
        if run.info.status != "RUNNING":  # a resumed job continues it
            client.update_run(run_id, status="RUNNING")
        done = {m.step for m in client.get_metric_history(run_id, STEP_KEY)}
        root = (run.info.artifact_uri or "").split(":", 1)[0]
        local = root not in REMOTE_ARTIFACTS and self.uri.startswith("http")
        if local:
            log.warning("MLflow: the run's artifacts would go to a path on the server's disk "
                        "(a server without --serve-artifacts): none are sent")
        with self._cond:
            for key, value in run.data.params.items():  # a param never changes its value
                if key in self._params and self._params[key] != value:
                    log.warning("MLflow: param %s stays %r (now %r): params cannot change",
                                key, value, self._params[key])
                    self._tags[f"trainjob.resumed_with.{key}"] = self._params[key]
                self._params.pop(key, None)
            self._done, self._local_artifacts, self._run_id = done, local, run_id
            for epoch in done:  # a killed attempt's epochs: never sent again
                self._epochs.pop(epoch, None)
        self.record.update(run_id=run_id, experiment_id=exp.experiment_id)
        self._write_record()
        self.on_record(TRACKING)
        log.info("MLflow: run %s (experiment %s) holds epochs %s", run_id,
                 exp.experiment_id, _span(done))

    def _find_run(self, client: Any, experiment_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        if run_id := self.record.get("run_id"):
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    return run
                log.warning("MLflow: run %s was deleted; starting another", run_id)
                return None
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        found = client.search_runs([experiment_id], max_results=1, filter_string=(
            f"tags.`trainjob.run_key` = '{self.record['run_key']}'"))
        return found[0] if found else None

    def _refusable(self, send: Callable[[], object], what: str) -> None:
        """Send; what the server refuses (4xx but 408/429) is dropped, not retried."""
        from mlflow.exceptions import MlflowException

        try:
            send()
        except MlflowException as exc:
            code = exc.get_http_status_code()
            if not (400 <= code < 500) or code in (408, 429):
                raise
            log.warning("MLflow refused %s: %s", what, _short(exc))

    def _pending(self) -> list[str]:
        return [p for p in (f"epochs {_span(set(self._sendable()))}" if self._sendable() else "",
                            "params" if self._params else "",
                            "test metrics" if self._final else "",
                            f"{len(self._artifacts)} artifacts" if self._artifacts else "",
                            f"status {self._status}" if self._status else "") if p]

    def _write_record(self) -> None:
        path = self.folder / TRACKING
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TRACKING}.tmp")
        tmp.write_text(json.dumps(self.record, indent=2, sort_keys=True))
        os.replace(tmp, path)




def _drop(pending: dict, sent: Mapping) -> None:
    for key, value in sent.items():
        if pending.get(key) == value:
            pending.pop(key)


def _chunks(rows: list[Mapping[str, Any]], limit: int) -> Iterable[list[Mapping[str, Any]]]:
    chunk: list[Mapping[str, Any]] = []
    size = 0
    for row in rows:
        n = len(row_metrics(row))
        if chunk and size + n > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += n
    if chunk:
        yield chunk


def _span(steps: set[int]) -> str:
    return f"{min(steps)}..{max(steps)} ({len(steps)})" if steps else "none"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."
