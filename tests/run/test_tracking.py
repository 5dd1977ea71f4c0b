"""run.tracking against a real MLflow tracking server (``mlflow server``, SQLite): one MLflow
run per run folder across resumes, each epoch once and only once its save point is stored,
a server that is not there costs a warning and a bounded wait, never an error."""

from __future__ import annotations

import time

import mlflow  # the test extra's; the job's own extra (the client alone) stays optional
import pytest
from helpers.mlflowserver import free_port

from trainjob.config import Config
from trainjob.errors import ConfigError
from trainjob.run import tracking
from trainjob.run.folder import TRACKING, RunFolder, read_json
from trainjob.store.local import LocalStore



def _tracker(server_url: str, folder, experiment: str, **kw) -> tracking.Tracker:
    return tracking.Tracker(server_url, experiment, folder, run_name="r1",
                            params={"optim.epochs": "4"}, tags={"trainjob.run_folder": "x"},
                            **kw)


def _rows(epochs, value: float) -> list[dict]:
    return [{"epoch": e, "loss": value + e, "accuracy": 0.5, "finished_at": 1000.0 + e}
            for e in epochs]


def _history(server_url: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(tracking_uri=server_url)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_one_run_per_folder_each_epoch_once_and_only_once_stored(mlflow_server, tmp_path):
    folder = tmp_path / "run"
    first = _tracker(mlflow_server.url, folder, "exp-once")
    first.log_history(_rows(range(3), 10.0))
    first.confirm(1)  # epoch 2's save point is not stored yet: it must not be sent
    assert first.close("KILLED", 30)
    run_id = read_json(folder / TRACKING)["run_id"]
    assert _history(mlflow_server.url, run_id) == [(0, 10.0), (1, 11.0)]

    # A resumed job (a new process: a new tracker on the same folder) redoes epoch 2 with
    # other values and trains epoch 3: the same MLflow run, every epoch once, the redone
    # epoch with the values the run folder keeps.
    again = _tracker(mlflow_server.url, folder, "exp-once")
    again.log_history(_rows(range(2), 10.0) + _rows(range(2, 4), 20.0))
    again.confirm(3)
    again.log_final({"accuracy": 0.75, "per_class_accuracy": {"a": 1.0}}, [])
    assert again.close("FINISHED", 30)
    assert read_json(folder / TRACKING)["run_id"] == run_id
    assert _history(mlflow_server.url, run_id) == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0)]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("exp-once").experiment_id])
    assert len(runs) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.epochs": "4"}
    assert run.data.metrics["test_accuracy"] == 0.75
    assert run.data.tags["trainjob.run_folder"] == "x"


def test_a_run_lost_before_its_id_was_stored_is_found_by_its_key(mlflow_server, tmp_path):
    folder = tmp_path / "run"
    first = _tracker(mlflow_server.url, folder, "exp-key")
    assert first.close("KILLED", 30)
    record = read_json(folder / TRACKING)
    (folder / TRACKING).write_text(
        f'{{"run_key": "{record["run_key"]}", "run_id": null}}')  # killed before the id
    again = _tracker(mlflow_server.url, folder, "exp-key")
    assert again.close("FINISHED", 30)
    assert read_json(folder / TRACKING)["run_id"] == record["run_id"]


def test_a_server_that_is_not_there_costs_a_warning_and_a_bounded_wait(tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = _tracker(dead, tmp_path / "run", "exp-dead")
    started = time.monotonic()
    tracker.log_history(_rows(range(2), 1.0))
    tracker.confirm(1)
    assert time.monotonic() - started < 0.5  # the job's side never waits
    assert not tracker.close("FINISHED", 2.0)
    assert time.monotonic() - started < 5.0
    assert "unreachable" in caplog.text and "gave up sending" in caplog.text


def test_tracking_is_off_unless_asked_for_and_the_option_without_the_extra_is_exit_2(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config.from_options(data="/d", output=str(tmp_path / "out"))
    with RunFolder(tmp_path / "out", LocalStore(tmp_path / "out")) as run:
        assert tracking.start(cfg, run) is None
        monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
        asked = Config.from_options(data="/d", output=str(tmp_path / "out"),
                                    mlflow_tracking_uri="http://mlflow:5000")
        with pytest.raises(ConfigError) as err:
            tracking.start(asked, run)
        assert "trainjob[mlflow]" in str(err.value)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # set for other tools
        assert tracking.start(cfg, run) is None


def test_secrets_of_the_tracking_uri_are_never_stored(tmp_path):
    assert tracking.redact("https://user:pw@mlflow.example:5000/path?token=abc") == \
        "https://mlflow.example:5000/path"
