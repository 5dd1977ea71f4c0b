"""trainjob.cli through click's CliRunner: option groups, TRAINJOB_* twins, exit codes.

``trainjob.job.run`` is replaced by a recorder so that the tests see the Config the CLI
builds without training; nothing else is stubbed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainjob import __version__
from trainjob.cli import cli, main, train
from trainjob.config import Config, option_fields
from trainjob.errors import ConfigError

GROUP_TITLES = ["Data", "Split", "Model", "Optimization", "Callbacks", "Output", "Runtime"]
REQUIRED = ["--data", "s3://datasets/caltech-101.zip", "--output", "s3://runs/exp1"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No TRAINJOB_* from the outer environment; logging restored after the CLI set it up."""
    for name in list(os.environ):
        if name.startswith("TRAINJOB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def recorded(monkeypatch):
    """Replace the training (job.run) with a recorder of the Config it is given."""
    calls: list[Config] = []
    monkeypatch.setattr("trainjob.job.run", calls.append)
    return calls


def invoke(args, env=None):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def find(cfg: Config, name: str):
    for group in dataclasses.fields(cfg):
        sub = getattr(cfg, group.name)
        if name in {f.name for f in dataclasses.fields(sub)}:
            return getattr(sub, name)
    raise KeyError(name)


# --- help, version ----------------------------------------------------------------------

def help_sections(text: str) -> dict[str, str]:
    """'<Title> options:' heading -> the text of its section."""
    parts = re.split(r"^(\w+) options:\s*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_help_shows_every_option_in_its_group():
    result = invoke(["train", "--help"])
    assert result.exit_code == 0
    sections = help_sections(result.output)
    for title in GROUP_TITLES:
        assert title in sections, f"no '{title} options:' section in --help"
    for title, f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"(^|\s){re.escape(flag)}(\s|/|$)", sections[title],
                         re.MULTILINE), \
            f"{flag} is not listed under '{title} options'"


def test_help_shows_each_env_twin():
    text = " ".join(invoke(["train", "--help"]).output.split())
    for _, f in option_fields():
        assert f"TRAINJOB_{f.name.upper()}" in text


def test_top_level_help_lists_global_options():
    text = invoke(["--help"]).output
    for flag in ("--version", "--debug", "--verbose", "--quiet", "train"):
        assert flag in text


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
    assert "trainjob" in result.output


def test_main_version_returns_zero(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


# --- building the config ------------------------------------------------------------------

# What a user is told the defaults are (README's Options table, the exit codes and the
# multi-worker section, --help where the README gives none), written out: comparing the CLI
# with Config's defaults would compare one field with itself.
DOCUMENTED_DEFAULTS = {
    # Data
    "include_background": False, "max_extract_bytes": 32 * 2**30, "max_bad_fraction": 0.05,
    "pipeline_cache": "auto",
    "stream_buffer": "10",
    # Split
    "val_fraction": 0.15, "test_fraction": 0.15, "train_per_class": None, "seed": 42,
    # Model
    "weights": "none", "image_size": 224, "precision": "auto", "jit_compile": "auto",
    # Optimization
    "epochs": 50, "batch_size": 32, "optimizer": "adam", "learning_rate": 3e-4,
    "momentum": 0.9, "label_smoothing": 0.0, "lr_schedule": "none", "class_weight": "none",
    "steps_per_epoch": None, "validation_freq": 1, "shuffle": True, "augment": True,
    "freeze_backbone_epochs": 0, "fine_tune_learning_rate": None, "lr_scaling": "none",
    # Callbacks
    "early_stopping_patience": 10, "early_stopping_monitor": "val_accuracy",
    "early_stopping_min_delta": 0.0, "early_stopping_mode": "auto",
    "checkpoint_monitor": "val_loss", "checkpoint_mode": "auto", "reduce_lr": True,
    "reduce_lr_monitor": "val_loss", "reduce_lr_mode": "auto", "reduce_lr_factor": 0.1,
    "reduce_lr_patience": 10, "reduce_lr_min_delta": 1e-4, "reduce_lr_cooldown": 0,
    "reduce_lr_min_lr": 0.0, "restore_best": True, "recalibrate_batchnorm": True,
    # Output
    "overwrite": False, "force": False, "lock_timeout": None, "sync": True,
    "backup_every_steps": 0, "upload_timeout": 600.0, "export": "none", "tensorboard": False,
    # Runtime
    "threads": 16, "grace_seconds": 25.0, "verbose_fit": "auto",
    # Cluster
    "workers": 1, "worker_hosts": "{job}-{index}.{service}", "worker_service": "trainjob-workers",
    "worker_port": 2222, "cluster_timeout": 600.0, "collective_timeout": 300.0,
    # Sweep
    "sweep_file": None, "trial_index": None,
    # Tracking
    "mlflow_tracking_uri": None, "mlflow_experiment": "trainjob",
}
HOME_DEFAULTS = ("cache_dir", "work_dir")  # $TRAINJOB_HOME/cache and /work: a subprocess


def test_cli_defaults_are_the_documented_ones(recorded):
    names = {f.name for _, f in option_fields()}
    assert names == set(DOCUMENTED_DEFAULTS) | {"data", "output", *HOME_DEFAULTS}, \
        "an option without a documented default here (or one that is gone)"
    result = invoke(["train", *REQUIRED])
    assert result.exit_code == 0, result.output
    [cfg] = recorded
    for name, expected in DOCUMENTED_DEFAULTS.items():
        assert find(cfg, name) == expected, name
    assert cfg.optim.fine_tune_rate == pytest.approx(3e-5)  # a tenth of --learning-rate


@pytest.mark.parametrize("env, root", [({"TRAINJOB_HOME": "/srv/tj"}, "/srv/tj"),
                                       ({"HOME": "/home/u"}, "/home/u/.cache/trainjob")])
def test_cache_and_work_dirs_default_under_trainjob_home(env, root):
    """Read when the module is imported, as in a container: a fresh interpreter each."""
    code = ("import trainjob.job; got = []; trainjob.job.run = got.append\n"
            "from trainjob.cli import main\n"
            f"main(['train', *{REQUIRED!r}])\n"
            "print(got[0].data.cache_dir, got[0].runtime.work_dir)")
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRAINJOB_")}
    proc = subprocess.run([sys.executable, "-c", code], env={**base, **env}, check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"{root}/cache", f"{root}/work"]


def test_options_reach_the_config(recorded):
    result = invoke(["train", *REQUIRED, "--epochs", "3", "--image-size", "64",
                     "--optimizer", "sgd", "--no-augment", "--train-per-class", "30",
                     "--include-background", "--lock-timeout", "2.5"])
    assert result.exit_code == 0, result.output
    [cfg] = recorded
    assert cfg.optim.epochs == 3 and cfg.model.image_size == 64
    assert cfg.optim.optimizer == "sgd" and cfg.optim.augment is False
    assert cfg.split.train_per_class == 30 and cfg.data.include_background is True
    assert cfg.output.lock_timeout == 2.5


STR_VALUES = {
    "data": "s3://env-bucket/other.tar.gz",
    "output": "s3://env-bucket/runs/env",
    "weights": "imagenet",
    "cache_dir": "/tmp/trainjob-env/cache",
    "work_dir": "/tmp/trainjob-env/work",
    "worker_hosts": "10.0.0.{index}",
    "worker_service": "other-service",
    "mlflow_tracking_uri": "http://mlflow.example:5000",
    "mlflow_experiment": "other-experiment",
    "stream_buffer": "2GiB",
}


def env_value(f: dataclasses.Field):
    """A valid value different from the default, for each option."""
    default = f.default_factory() if callable(f.default_factory) else f.default
    meta = f.metadata
    if isinstance(default, bool):
        return not default
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != default)
    kind = meta["type"] or type(default)
    if kind is int:
        return 7 if default is None else default + 1
    if kind is float:
        if default is None:
            return 7.5
        if default == 0:
            return 0.01
        return default / 2 if default < 1 else default + 1.5
    if f.name in STR_VALUES:
        return STR_VALUES[f.name]
    if f.name.endswith("_monitor"):
        return "loss"
    pytest.fail(f"add a test value for the new string option {f.name!r} to STR_VALUES")


@pytest.mark.parametrize("name", [f.name for _, f in option_fields()])
def test_every_option_has_a_working_env_twin(name, recorded, tmp_path):
    f = {f.name: f for _, f in option_fields()}[name]
    if name in ("sweep_file", "trial_index"):  # each needs the other: a sweep of 8 trials
        sweep = tmp_path / "sweep.json"
        sweep.write_text('{"trials": [{}, {}, {}, {}, {}, {}, {}, {}]}')
        value = str(sweep) if name == "sweep_file" else 7
        env = {"TRAINJOB_SWEEP_FILE": str(sweep), "TRAINJOB_TRIAL_INDEX": "7"}
    else:
        value = env_value(f)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env = {f"TRAINJOB_{name.upper()}": text}
    args = ["train"]
    if name != "data":
        args += REQUIRED[:2]
    if name != "output":
        args += REQUIRED[2:]
    result = invoke(args, env=env)
    assert result.exit_code == 0, result.output
    [cfg] = recorded
    assert find(cfg, name) == value, f"TRAINJOB_{name.upper()}={env} did not set {name}"


def test_env_twins_alone_can_configure_a_run(recorded):
    """A Kubernetes ConfigMap sets everything through the environment."""
    env = {"TRAINJOB_DATA": "s3://datasets/caltech-101.zip", "TRAINJOB_OUTPUT": "/runs/x",
           "TRAINJOB_EPOCHS": "5", "TRAINJOB_SYNC": "false", "TRAINJOB_LR_SCHEDULE": "exp-decay"}
    result = invoke(["train"], env=env)
    assert result.exit_code == 0, result.output
    [cfg] = recorded
    assert (cfg.data.data, cfg.output.output, cfg.optim.epochs, cfg.output.sync,
            cfg.optim.lr_schedule) == ("s3://datasets/caltech-101.zip", "/runs/x", 5, False,
                                       "exp-decay")


def test_command_line_beats_env(recorded):
    result = invoke(["train", *REQUIRED, "--epochs", "4"], env={"TRAINJOB_EPOCHS": "9"})
    assert result.exit_code == 0
    assert recorded[0].optim.epochs == 4


def test_train_command_is_exported():
    assert train.name == "train" and "train" in cli.commands


# --- errors and exit codes ----------------------------------------------------------------

def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_unknown_option_exits_2_with_one_line(capsys, recorded):
    assert main(["train", *REQUIRED, "--no-such-option", "1"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("trainjob: error:") and "--no-such-option" in err[0]
    assert not recorded


def test_val_fraction_out_of_range_exits_2_with_one_line(capsys, recorded):
    assert main(["train", *REQUIRED, "--val-fraction", "1.5"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert "--val-fraction" in err[0] and "1.5" in err[0]
    assert "Traceback" not in err[0]
    assert not recorded


def test_missing_required_option_exits_2(capsys, recorded):
    assert main(["train", "--data", "s3://datasets/x.zip"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "--output" in err[0]


def test_bad_choice_and_bad_number_exit_2(capsys, recorded):
    assert main(["train", *REQUIRED, "--optimizer", "rmsprop"]) == 2
    assert main(["train", *REQUIRED, "--epochs", "many"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 2 and "rmsprop" in err[0] and "many" in err[1]


def test_unknown_uri_scheme_exits_2(capsys, recorded):
    assert main(["train", "--data", "gs://bucket/data.zip", "--output", "/tmp/x"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "gs://" in err[0]
    assert not recorded


def test_job_errors_map_to_their_exit_codes(capsys, monkeypatch):
    from trainjob.errors import DataError, StorageError

    for exc, code in ((DataError("no images\nat all"), 3), (StorageError("no bucket"), 4)):
        def boom(cfg, exc=exc):
            raise exc
        monkeypatch.setattr("trainjob.job.run", boom)
        assert main(["train", *REQUIRED]) == code
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and str(exc).split()[0] in err[0]


def test_unexpected_exception_is_one_line_without_debug(capsys, monkeypatch):
    def boom(cfg):
        raise RuntimeError("kaboom")
    monkeypatch.setattr("trainjob.job.run", boom)
    assert main(["train", *REQUIRED]) == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "kaboom" in err and "Traceback" not in err
    assert main(["--debug", "train", *REQUIRED]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_console_entry_in_a_subprocess_prints_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINJOB_")}
    proc = subprocess.run([sys.executable, "-m", "trainjob.cli", "train", *REQUIRED,
                           "--val-fraction", "1.5"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()
             and not line.startswith(("WARNING: All log messages before absl", "I0000",
                                      "E0000", "W0000"))]
    assert len(lines) == 1 and "--val-fraction" in lines[0], proc.stderr


def test_config_error_type_is_exit_2():
    assert ConfigError.exit_code == 2


# --- --lr-schedule exp-decay ---------------------------------------------------------------

def reference_schedule(epoch: int, base: float) -> float:
    return base if epoch < 10 else base * math.exp(0.1 * (10 - epoch))


def built_callbacks(cfg: Config, tmp_path: Path) -> list:
    from trainjob.run.folder import RunFolder
    from trainjob.run.state import RunState
    from trainjob.run.stop import StopSignal
    from trainjob.store.local import LocalStore
    from trainjob.train import callbacks as callbacks_lib

    run = RunFolder(tmp_path / "run", LocalStore(tmp_path / "run"))
    state = RunState(run, history=[], fingerprint={}, stop=StopSignal())
    try:
        keeper = callbacks_lib.RunKeeper(state, steps_per_epoch=10)
        return callbacks_lib.make_callbacks(cfg, run, keeper)
    finally:
        run.uploader.close()


def test_exp_decay_maps_to_the_reference_scheduler(recorded, tmp_path):
    keras = pytest.importorskip("keras")
    result = invoke(["train", *REQUIRED, "--lr-schedule", "exp-decay", "--learning-rate", "0.01"])
    assert result.exit_code == 0, result.output
    [cfg] = recorded
    assert cfg.optim.lr_schedule == "exp-decay"
    callbacks = built_callbacks(cfg, tmp_path)
    schedulers = [c for c in callbacks if isinstance(c, keras.callbacks.LearningRateScheduler)]
    assert len(schedulers) == 1
    assert not any(isinstance(c, keras.callbacks.ReduceLROnPlateau) for c in callbacks)
    schedule = schedulers[0].schedule
    lr = 0.01
    for epoch in range(40):
        expected = reference_schedule(epoch, 0.01)
        lr = schedule(epoch, lr)
        assert lr == pytest.approx(expected, rel=1e-9), f"epoch {epoch}"
    assert schedule(10, 0.01) == pytest.approx(0.01)
    assert schedule(11, 0.01) == pytest.approx(0.01 * math.exp(-0.1))
    assert schedule(20, 0.01) == pytest.approx(0.01 * math.exp(-1.0))


def test_default_schedule_is_reduce_lr_on_plateau_with_keras_defaults(recorded, tmp_path):
    keras = pytest.importorskip("keras")
    assert invoke(["train", *REQUIRED]).exit_code == 0
    callbacks = built_callbacks(recorded[0], tmp_path)
    assert not any(isinstance(c, keras.callbacks.LearningRateScheduler) for c in callbacks)
    [plateau] = [c for c in callbacks if isinstance(c, keras.callbacks.ReduceLROnPlateau)]
    reference = keras.callbacks.ReduceLROnPlateau()
    for attr in ("monitor", "factor", "patience", "min_delta", "cooldown", "min_lr", "mode"):
        assert getattr(plateau, attr) == getattr(reference, attr), attr
