"""trainjob.config: defaults that follow the reference script, validation, to_dict."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainjob.config import GROUPS, CallbackConfig, Config, option_fields
from trainjob.errors import ConfigError

DATA = "s3://datasets/caltech-101.zip"
OUTPUT = "s3://runs/exp1"


def make(**overrides) -> Config:
    return Config.from_options(**{"data": DATA, "output": OUTPUT, **overrides})


# --- defaults ---------------------------------------------------------------------------

def test_defaults_follow_the_reference_script():
    cfg = make()
    assert cfg.optim.optimizer == "adam"
    assert cfg.optim.learning_rate == pytest.approx(3e-4)
    assert cfg.optim.epochs == 50
    assert cfg.model.image_size == 224
    assert cfg.callbacks.early_stopping_monitor == "val_accuracy"
    assert cfg.callbacks.early_stopping_patience == 10
    assert cfg.callbacks.checkpoint_monitor == "val_loss"
    assert cfg.callbacks.reduce_lr is True
    assert cfg.callbacks.restore_best is True
    assert cfg.callbacks.recalibrate_batchnorm is True
    assert cfg.optim.lr_schedule == "none"  # ReduceLROnPlateau, not the scheduler, by default
    assert cfg.optim.label_smoothing == 0.0
    assert cfg.data.include_background is False
    assert cfg.split.val_fraction == pytest.approx(0.15)
    assert cfg.split.test_fraction == pytest.approx(0.15)
    assert cfg.split.train_per_class is None


def test_reduce_lr_defaults_equal_keras_defaults():
    keras = pytest.importorskip("keras")
    reference = keras.callbacks.ReduceLROnPlateau()
    c = CallbackConfig()
    for attr in ("monitor", "factor", "patience", "min_delta", "cooldown", "min_lr"):
        ours = getattr(c, f"reduce_lr_{attr}")
        theirs = getattr(reference, attr)
        assert ours == pytest.approx(theirs), f"reduce_lr_{attr} = {ours!r}, Keras: {theirs!r}"
    if hasattr(c, "reduce_lr_mode"):
        assert c.reduce_lr_mode == reference.mode


def test_early_stopping_min_delta_matches_keras_default():
    keras = pytest.importorskip("keras")
    assert CallbackConfig().early_stopping_min_delta == keras.callbacks.EarlyStopping().min_delta


def test_config_is_frozen():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.epochs = 3  # type: ignore[misc]


# --- validation ---------------------------------------------------------------------------

BAD = [
    pytest.param({"val_fraction": 1.5}, "--val-fraction", id="val-fraction>1"),
    pytest.param({"val_fraction": -0.1}, "--val-fraction", id="val-fraction<0"),
    pytest.param({"test_fraction": 1.0}, "--test-fraction", id="test-fraction=1"),
    pytest.param({"val_fraction": 0.5, "test_fraction": 0.5}, "--test-fraction",
                 id="no-training-data-left"),
    pytest.param({"max_bad_fraction": 1.5}, "--max-bad-fraction", id="max-bad-fraction>1"),
    pytest.param({"max_bad_fraction": -0.01}, "--max-bad-fraction", id="max-bad-fraction<0"),
    pytest.param({"label_smoothing": 1.0}, "--label-smoothing", id="label-smoothing=1"),
    pytest.param({"reduce_lr_factor": 1.0}, "--reduce-lr-factor", id="reduce-lr-factor=1"),
    pytest.param({"train_per_class": 0}, "--train-per-class", id="train-per-class=0"),
    pytest.param({"image_size": 16}, "--image-size", id="image-size<32"),
    pytest.param({"epochs": 0}, "--epochs", id="epochs=0"),
    pytest.param({"batch_size": 0}, "--batch-size", id="batch-size=0"),
    pytest.param({"validation_freq": 0}, "--validation-freq", id="validation-freq=0"),
    pytest.param({"steps_per_epoch": 0}, "--steps-per-epoch", id="steps-per-epoch=0"),
    pytest.param({"learning_rate": 0.0}, "--learning-rate", id="learning-rate=0"),
    pytest.param({"learning_rate": -1e-3}, "--learning-rate", id="learning-rate<0"),
    pytest.param({"early_stopping_patience": -1}, "patience", id="patience<0"),
    pytest.param({"reduce_lr_patience": -1}, "patience", id="reduce-lr-patience<0"),
    pytest.param({"threads": 0}, "--threads", id="threads=0"),
    pytest.param({"max_extract_bytes": 0}, "--max-extract-bytes", id="max-extract-bytes=0"),
    pytest.param({"backup_every_steps": -1}, "--backup-every-steps", id="backup-steps<0"),
    pytest.param({"weights": ""}, "--weights", id="weights-empty"),
    pytest.param({"freeze_backbone_epochs": -1}, "--freeze-backbone-epochs", id="freeze<0"),
    pytest.param({"fine_tune_learning_rate": 0.0}, "--fine-tune-learning-rate", id="ft-lr=0"),
    pytest.param({"data": ""}, "--data", id="data-missing"),
    pytest.param({"output": ""}, "--output", id="output-missing"),
]


@pytest.mark.parametrize("overrides, names", BAD)
def test_invalid_settings_raise_config_error(overrides, names):
    with pytest.raises(ConfigError) as err:
        make(**overrides)
    assert err.value.exit_code == 2
    message = str(err.value)
    assert names in message, message
    assert "\n" not in message


UNSUPPORTED = "use s3://bucket/key or a local path"


@pytest.mark.parametrize("field, uri, expected", [
    ("data", "gs://bucket/caltech-101.zip", ["unsupported URI scheme 'gs://'", UNSUPPORTED]),
    ("data", "http://example.com/caltech-101.zip", ["unsupported URI scheme 'http://'",
                                                     UNSUPPORTED]),
    ("data", "s3:///no-bucket.zip", ["names no bucket", "use s3://bucket/key"]),
    ("output", "ftp://host/runs/exp1", ["unsupported URI scheme 'ftp://'", UNSUPPORTED]),
    ("output", "gs://runs/exp1", ["unsupported URI scheme 'gs://'", UNSUPPORTED]),
    ("weights", "gs://models/resnet.weights.h5", ["unsupported URI scheme 'gs://'",
                                                  UNSUPPORTED]),
])
def test_unknown_uri_schemes_raise_config_error(field, uri, expected):
    """One line naming the URI, what is wrong with it and what to use instead (any message
    holding "bucket" passed before, and every one of these does)."""
    with pytest.raises(ConfigError) as err:
        make(**{field: uri})
    assert err.value.exit_code == 2
    message = str(err.value)
    assert repr(uri) in message and "\n" not in message, message
    for needle in expected:
        assert needle in message, message


@pytest.mark.parametrize("field, uri", [
    ("data", "s3://datasets/caltech/"),
    ("data", "s3a://datasets/caltech-101.tar.gz"),
    ("data", "/data/caltech-101.zip"),
    ("data", "relative/folder"),
    ("data", "file:///data/caltech-101.zip"),
    ("output", "/runs/exp1"),
    ("weights", "s3://models/resnet.weights.h5"),
    ("weights", "/models/resnet.weights.h5"),
    ("weights", "s3://models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ("weights", "imagenet"),
])
def test_supported_uris_are_accepted(field, uri):
    assert getattr(getattr(make(**{field: uri}), {"data": "data", "output": "output",
                                                  "weights": "model"}[field]), field) == uri


def test_valid_edge_values_are_accepted():
    cfg = make(val_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.0, image_size=32,
               early_stopping_patience=0, train_per_class=1)
    assert cfg.split.val_fraction == 0.0 and cfg.callbacks.early_stopping_patience == 0


def test_momentum_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError):
        make(optimizer="sgd", momentum=1.5)


def test_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown settings: no_such_option"):
        make(no_such_option=1)


# --- to_dict --------------------------------------------------------------------------

def test_to_dict_has_every_group_and_field():
    cfg = make(epochs=3, seed=7)
    d = cfg.to_dict()
    # Every option group, and not the sweep trial (config.json records it apart).
    assert set(d) == {f.name for f in dataclasses.fields(Config)} - {"trial"}
    assert set(d) == {"data", "split", "model", "optim", "callbacks", "output", "runtime",
                      "cluster", "sweep", "tracking"}
    for config_field, group in zip(dataclasses.fields(Config), GROUPS.values()):
        assert set(d[config_field.name]) == {f.name for f in dataclasses.fields(group)}
    assert d["optim"]["epochs"] == 3 and d["split"]["seed"] == 7
    json.dumps(d)  # goes into config.json as is


def test_to_dict_round_trips_through_from_options():
    cfg = make(epochs=3, optimizer="sgd", train_per_class=30, include_background=True)
    flat = {k: v for group in cfg.to_dict().values() for k, v in group.items()}
    assert Config.from_options(**flat) == cfg


def test_option_fields_cover_every_group_once():
    titles = [t for t, _ in option_fields()]
    assert list(dict.fromkeys(titles)) == ["Data", "Split", "Model", "Optimization",
                                           "Callbacks", "Output", "Runtime", "Cluster",
                                           "Sweep", "Tracking"]
    names = [f.name for _, f in option_fields()]
    assert len(names) == len(set(names)), "an option name is declared twice"
    for _, f in option_fields():
        assert f.metadata["help"], f"{f.name} has no help text"
