"""Sweeps (sweep.py): the trial order, merging a trial over the command line and the
environment, the per-trial run folder, config.json's record, and the one-line exit-2 errors
for a bad sweep file, through the real CLI."""

from __future__ import annotations

import json
import os

import pytest

from trainjob.cli import main, train
from trainjob.errors import ConfigError
from trainjob.run import configfile, sweep
from trainjob.run.folder import CONFIG, RunFolder
from trainjob.store.local import LocalStore

REQUIRED = ("--data", "s3://datasets/caltech-101.zip", "--output", "s3://runs/sweep1/")
GRID = {"grid": {"learning_rate": [0.001, 0.0003], "freeze_backbone_epochs": [0, 5]}}
TRIALS = {"trials": [{"learning_rate": 0.001}, {"optimizer": "sgd", "momentum": 0.8}, {}]}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TRAINJOB_") or name == sweep.INDEX_ENV:
            monkeypatch.delenv(name)


def write(tmp_path, doc, name="sweep.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def configure(args: list[str], env: dict | None = None):
    """The Config ``trainjob train ARGS`` would run, as cli.train builds it."""
    return sweep.configure(train.make_context("train", list(args)).params, env or {})


# --- the trials -----------------------------------------------------------------------------

def test_grid_order_is_nested_loops_last_key_fastest(tmp_path):
    loaded = sweep.load(write(tmp_path, GRID))
    assert loaded.count == 4
    assert [dict(loaded.trial(i)) for i in range(4)] == [
        {"learning_rate": 0.001, "freeze_backbone_epochs": 0},
        {"learning_rate": 0.001, "freeze_backbone_epochs": 5},
        {"learning_rate": 0.0003, "freeze_backbone_epochs": 0},
        {"learning_rate": 0.0003, "freeze_backbone_epochs": 5}]
    three = sweep.load(write(tmp_path, {"grid": {"epochs": [1, 2, 3], "optimizer": ["adam", "sgd"],
                                                 "seed": [7, 8]}}))
    assert three.count == 12
    assert dict(three.trial(7)) == {"epochs": 2, "optimizer": "sgd", "seed": 8}
    with pytest.raises(IndexError):
        three.trial(12)


def test_explicit_trials_in_order(tmp_path):
    loaded = sweep.load(write(tmp_path, TRIALS))
    assert loaded.count == 3
    assert loaded.trial(1) == (("optimizer", "sgd"), ("momentum", 0.8))
    assert loaded.trial(2) == ()


def test_a_trial_overrides_command_line_and_env_and_gets_its_own_folder(tmp_path,
                                                                        monkeypatch):
    path = write(tmp_path, GRID)
    env = {sweep.INDEX_ENV: "3"}
    monkeypatch.setenv("TRAINJOB_LEARNING_RATE", "0.5")
    cfg = configure([*REQUIRED, "--sweep-file", path, "--freeze-backbone-epochs", "2",
                     "--epochs", "7"], env)
    assert cfg.optim.learning_rate == 0.0003  # the trial's, not the environment's 0.5
    assert cfg.optim.freeze_backbone_epochs == 5  # the trial's, not the command line's 2
    assert cfg.optim.epochs == 7  # not in the trial: the command line's
    assert cfg.output.output == "s3://runs/sweep1/trial-003"
    assert cfg.sweep.trial_index == 3 and cfg.sweep.sweep_file == path
    assert cfg.trial.to_dict() == {"index": 3, "count": 4, "sweep_file": path, "settings": {
        "learning_rate": 0.0003, "freeze_backbone_epochs": 5}}
    # --trial-index beats JOB_COMPLETION_INDEX; a long sweep widens the number
    cfg = configure([*REQUIRED, "--sweep-file", path, "--trial-index", "1"], env)
    assert cfg.output.output.endswith("/trial-001") and cfg.trial.index == 1
    big = write(tmp_path, {"grid": {"seed": list(range(1200))}}, "big.json")
    assert configure([*REQUIRED, "--sweep-file", big, "--trial-index", "5"]).output.output \
        == "s3://runs/sweep1/trial-0005"


def test_without_a_sweep_nothing_changes(tmp_path):
    cfg = configure(REQUIRED, {sweep.INDEX_ENV: "1"})  # a multi-worker pod has the index too
    assert cfg.trial is None and cfg.output.output == "s3://runs/sweep1/"


def test_config_json_records_the_trial(tmp_path):
    cfg = configure([*REQUIRED, "--sweep-file", write(tmp_path, TRIALS), "--trial-index", "1"])
    local = tmp_path / "run"
    with RunFolder(local, LocalStore(local)) as run_dir:
        configfile.RunRecord(run_dir, cfg).write()
    recorded = json.loads((local / CONFIG).read_text())
    assert recorded["trial"] == {"index": 1, "count": 3, "sweep_file": str(tmp_path /
                                                                            "sweep.json"),
                                 "settings": {"optimizer": "sgd", "momentum": 0.8}}
    assert recorded["settings"]["sweep"] == {"sweep_file": str(tmp_path / "sweep.json"),
                                             "trial_index": 1}
    assert recorded["settings"]["optim"]["optimizer"] == "sgd"
    plain = configure(REQUIRED)
    with RunFolder(local, LocalStore(local)) as run_dir:
        configfile.RunRecord(run_dir, plain).write()
    assert json.loads((local / CONFIG).read_text())["trial"] is None


# --- bad sweeps: exit 2, one line, naming what and where ------------------------------------

BAD = [
    ({"grid": {"learning_rat": [0.1]}}, [], "grid.learning_rat: unknown setting "
     "'learning_rat' (did you mean learning_rate?)"),
    ({"trials": [{}, {"optimizer": "rmsprop"}]}, [],
     'trials[1].optimizer: "rmsprop" is not one of adam, sgd'),
    ({"grid": {"epochs": [3, 2.5]}}, [], "grid.epochs[1]: 2.5 is not an integer"),
    ({"grid": {"learning_rate": ["fast"]}}, [], 'grid.learning_rate[0]: "fast" is not a number'),
    ({"grid": {"augment": ["no"]}}, [], 'grid.augment[0]: "no" is not true or false'),
    ({"trials": [{"output": "s3://x/y"}]}, [], "trials[0].output: output cannot be set per "
     "trial"),
    ({"trials": [{"workers": 2}]}, [], "trials[0].workers: workers cannot be set per trial"),
    ({"grid": {"seed": []}}, [], "grid.seed must be a non-empty list of values"),
    ({"sweep": {"seed": [1]}}, [], "a sweep file is one object with one key"),
    ('{"grid": {"seed": [1,]}}', [], "not valid JSON at line 1 column 22: Expecting value"),
    ({"trials": [{"learning_rate": -1}]}, [], "trial 0 (learning_rate=-1.0): --learning-rate "
     "must be positive"),
    ({"trials": [{}, {}]}, ["--trial-index", "2"], "--trial-index 2 is out of range: "),
    ({"trials": [{}]}, ["--workers", "2"], "--workers 2 with --sweep-file: a sweep runs each "
     "trial on one pod"),
]


@pytest.mark.parametrize("doc,extra,expected", BAD, ids=[b[2][:30] for b in BAD])
def test_a_bad_sweep_is_exit_2_in_one_line(tmp_path, capsys, doc, extra, expected):
    path = write(tmp_path, doc)
    args = ["train", *REQUIRED, "--sweep-file", path, *extra]
    if "--trial-index" not in extra:
        args += ["--trial-index", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trainjob: error: "), err
    assert expected in err, err
    if "--workers" not in extra and "--trial-index" not in extra:
        assert path in err, "the line names the sweep file"


def test_the_index_comes_from_kubernetes_or_the_option(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, TRIALS)
    assert main(["train", *REQUIRED, "--sweep-file", path]) == 2
    assert "needs --trial-index N (or JOB_COMPLETION_INDEX" in capsys.readouterr().err
    monkeypatch.setenv(sweep.INDEX_ENV, "5")
    assert main(["train", *REQUIRED, "--sweep-file", path]) == 2
    assert (f"JOB_COMPLETION_INDEX=5 is out of range: {path} has 3 trials (0-2); the Job's "
            "completions must be 3") in capsys.readouterr().err
    assert main(["train", *REQUIRED, "--trial-index", "1"]) == 2
    assert "--trial-index 1 needs --sweep-file" in capsys.readouterr().err
    assert main(["train", *REQUIRED, "--sweep-file", str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err


def test_check_value_keeps_types_exact():
    assert sweep.check_value("learning_rate", 1, "w") == 1.0
    assert sweep.check_value("steps_per_epoch", None, "w") is None  # default None: allowed
    for key, value in (("epochs", True), ("shuffle", 1), ("epochs", None), ("weights", 3)):
        with pytest.raises(ConfigError):
            sweep.check_value(key, value, "w")
