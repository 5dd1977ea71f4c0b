"""Fine-tuning (issue #10): --weights kinds told apart by content, Keras' no-top file into the
backbone only, the frozen head phase and the unfrozen phase, and the schedule's plan.

In-process at 32 px with 1-2 steps (the frozen-phase check eagerly: tracing ResNet50 costs
more than the steps), except two e2e tests through the real CLI: the ImageNet check without
network (it fails before TensorFlow is imported) and one kill-and-resume scenario across
the phase boundary, which also covers the traced (graph) path."""

from __future__ import annotations

import json
import shutil
import signal
import time

import h5py
import keras
import numpy as np
import pytest
from conftest import SMALL, SMALL_STAND_IN, run_trainjob, start_trainjob
from helpers.jobs import csv_epochs, hooks_file, stored_json, wait_for

from trainjob.config import Config, ModelConfig
from trainjob.errors import ConfigError, DataError
from trainjob.run import phases
from trainjob.store import digests
from trainjob.train import model as models
from trainjob.train import trainer, weights

SIZE = 32


@pytest.fixture(autouse=True)
def _float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def notop(tmp_path_factory):
    """A no-top ResNet50 with known random weights, in Keras' published (legacy HDF5) layout."""
    from keras.src.legacy.saving import legacy_h5_format

    backbone = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg",
                                           input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(7)
    backbone.set_weights([(np.abs(rng.normal(size=w.shape)) + 0.5).astype(w.dtype)
                          for w in backbone.get_weights()])
    path = tmp_path_factory.mktemp("notop") / "resnet50-notop-random.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    return path, backbone.get_weights()


def test_the_published_hash_is_keras_own():
    from keras.src.applications import resnet

    assert weights.NOTOP_MD5 == resnet.WEIGHTS_HASHES["resnet50"][1]  # md5, 32 hex digits
    assert weights.NOTOP_URL == resnet.BASE_WEIGHTS_PATH + weights.NOTOP_FILE


def test_a_notop_file_loads_into_the_backbone_and_the_head_starts_fresh(notop, tmp_path):
    path, expected = notop
    initial = weights.resolve(str(path), tmp_path / "cache", 2)
    assert initial.kind == weights.BACKBONE
    model = models.build_model(ModelConfig(image_size=SIZE, weights=str(path)), 3, initial)
    for a, b in zip(models.backbone_of(model).get_weights(), expected):
        np.testing.assert_array_equal(a, b)
    kernel, bias = model.get_layer("predictions").get_weights()
    assert kernel.shape == (2048, 3) and not bias.any()  # fresh: Dense's own initializers

    # A full trainjob model is still a full model, whatever its file is called.
    full = tmp_path / "model.weights.h5"
    model.save_weights(full)
    renamed = tmp_path / "exported.bin"
    shutil.copy(full, renamed)
    initial = weights.resolve(str(renamed), tmp_path / "cache", 2)
    assert initial.kind == weights.MODEL
    again = models.build_model(ModelConfig(image_size=SIZE, weights=str(renamed)), 3, initial)
    for a, b in zip(again.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_other_files_are_refused_with_exit_2(tmp_path):
    random_h5 = tmp_path / "random.weights.h5"
    with h5py.File(random_h5, "w") as f:
        f.create_dataset("x", data=np.arange(10))
    not_h5 = tmp_path / "notes.h5"
    not_h5.write_text("not weights")
    for path in (random_h5, not_h5, tmp_path / "missing.h5"):
        with pytest.raises(ConfigError) as err:
            weights.resolve(str(path), tmp_path / "cache", 2)
        assert err.value.exit_code == 2 and "--weights" in str(err.value)
        assert "\n" not in str(err.value)


def test_a_file_named_like_keras_with_other_bytes_is_exit_3_with_both_hashes(
        notop, s3env, tmp_path):
    """Through the store, as --weights s3://... is fetched: Keras' name, other contents."""
    path, _ = notop
    s3env.client().create_bucket(Bucket="mirror")
    s3env.client().upload_file(str(path), "mirror", f"models/{weights.NOTOP_FILE}")
    with pytest.raises(DataError) as err:
        weights.resolve(f"s3://mirror/models/{weights.NOTOP_FILE}", tmp_path / "cache", 2)
    assert err.value.exit_code == 3
    assert weights.NOTOP_MD5 in str(err.value) and digests.md5(path) in str(err.value)


def test_the_plan_splits_at_the_boundary():
    H, F, S = phases.HEAD, phases.FULL, phases.Segment
    assert phases.plan(0, 0, 0, 3) == [S(F, 0, 3)]
    assert phases.plan(0, 0, 2, 5) == [S(H, 0, 2), S(F, 2, 5)]
    assert phases.plan(1, 3, 2, 5) == [S(H, 1, 2, 3), S(F, 2, 5)]
    assert phases.plan(1, 3, 3, 5) == [S(H, 1, 2, 3), S(H, 2, 3), S(F, 3, 5)]
    assert phases.plan(3, 0, 2, 5) == [S(F, 3, 5)]
    assert phases.plan(0, 0, 9, 3) == [S(H, 0, 3)]
    optim = Config.from_options(data="/d", output="/o", learning_rate=1e-3).optim
    assert optim.fine_tune_rate == pytest.approx(1e-4)
    # Only crossing the boundary sets the fine-tune rate; a resume keeps its saved rate.
    assert phases.entry_rate(F, H, optim) == pytest.approx(1e-4)
    assert phases.entry_rate(F, F, optim) is None and phases.entry_rate(H, None, optim) is None
    assert phases.phase_of_record({"epoch": 2, "step": 0, "phase": H}, 2) == H
    assert phases.phase_of_record({"epoch": 2, "step": 0}, 2) == H  # an older record
    assert phases.phase_of_record({"epoch": 3, "from_checkpoint": "x"}, 2) == H  # fresh optim


def test_exp_decay_restarts_from_the_fine_tune_rate():
    from trainjob.train import callbacks as cb

    schedule = cb.exp_decay(1e-2, 1e-3, 5)
    assert schedule(0, 9.0) == 1e-2 and schedule(4, 9.0) == 1e-2
    assert schedule(5, 9.0) == 1e-3
    assert schedule(12, 9.0) == pytest.approx(1e-3 * np.exp(-0.2))
    assert cb.exp_decay(1e-2)(12, 9.0) == pytest.approx(1e-2 * np.exp(-0.2))


@pytest.mark.training
def test_frozen_phase_changes_only_the_head_then_the_backbone_trains(tmp_path):
    cfg = Config.from_options(data="/d", output="/o", image_size=SIZE, epochs=2,
                              freeze_backbone_epochs=1, learning_rate=1e-2, label_smoothing=0.1)
    model = models.build_model(cfg.model, 3)
    trainer.compile_model(model, cfg, 3)
    backbone = models.backbone_of(model)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    y = keras.utils.to_categorical([0, 1, 2, 0], 3)

    trainer.enter_phase(model, cfg, 3, phases.HEAD)
    assert len(model.trainable_variables) == 2  # the head's kernel and bias
    before = [v.numpy() for v in backbone.weights]  # kernels and BN moving statistics
    head = [v.numpy() for v in model.get_layer("predictions").weights]
    model.run_eagerly = True  # a traced ResNet50 step costs ~20 s here; the e2e test traces
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    for v, old in zip(backbone.weights, before):
        assert np.array_equal(v.numpy(), old), f"{v.path} changed while frozen"
    assert any(not np.array_equal(v.numpy(), old)
               for v, old in zip(model.get_layer("predictions").weights, head))

    trainer.enter_phase(model, cfg, 3, phases.FULL, rate=cfg.optim.fine_tune_rate)
    assert len(model.trainable_variables) == 2 + len(backbone.trainable_weights) > 200
    assert trainer.learning_rate(model) == pytest.approx(1e-3)
    assert model.loss.label_smoothing == pytest.approx(0.1)  # the recompile kept the loss
    model.run_eagerly = True
    model.fit(x, y, batch_size=2, initial_epoch=1, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4  # the step count carried over
    moving = [p for p, v in enumerate(backbone.weights) if "moving" in v.path]
    kernels = [p for p, v in enumerate(backbone.weights) if v.path.endswith("kernel")]
    for group in (moving, kernels):
        assert any(not np.array_equal(backbone.weights[p].numpy(), before[p]) for p in group)


@pytest.mark.e2e
def test_imagenet_without_network_fails_fast_before_the_data(s3, bucket, tmp_path):
    """No network (a proxy on a closed port) and an empty KERAS_HOME: exit 4 in seconds
    with the mirroring hint; the dataset (which does not exist) is never asked for."""
    env = s3.env(KERAS_HOME=str(tmp_path / "keras"), HTTPS_PROXY="http://127.0.0.1:9",
                 https_proxy="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost")
    started = time.monotonic()
    result = run_trainjob(["train", "--weights", "imagenet", "--data",
                           f"s3://{bucket}/datasets/not-there.zip", "--output",
                           f"s3://{bucket}/runs/imagenet", *SMALL], env, tmp_path / "home",
                          timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]
    assert elapsed < 30
    lines = result.error_lines()
    assert len(lines) == 1 and "mirror the file into a bucket" in lines[0], lines
    assert weights.NOTOP_FILE in lines[0]
    assert "not-there.zip" not in result.stdout + result.stderr
    assert not (tmp_path / "keras" / "models" / f"partial.{weights.NOTOP_FILE}").exists()


@pytest.mark.e2e
def test_resume_across_the_phase_boundary(s3, bucket, dataset, tmp_path):
    """Killed in phase 1 (head), its rerun killed in phase 2, the next rerun completes:
    each resumes in its phase, with its trainable set and learning rate, epochs once. The
    run state is the subject, so the small stand-in backbone trains (ResNet50's freezing is
    checked in process above)."""
    prefix = "runs/ft"
    args = ["train", "--data", dataset, "--output", f"s3://{bucket}/{prefix}", "--epochs", "4",
            "--freeze-backbone-epochs", "2", "--learning-rate", "0.001",
            "--steps-per-epoch", "2", "--val-fraction", "0", "--no-restore-best", *SMALL]
    head = "phase head: backbone frozen, 2 trainable variables, learning rate 0.001"
    # The stand-in's 8 variables (convolution, BatchNorm, two dense layers) and the head's 2.
    full = "phase full: backbone trainable, 10 trainable variables, learning rate 0.0001"

    def run_until(epochs_done: int, pause_after: int, name: str) -> str:
        log = tmp_path / f"{name}.log"
        env = s3.env(TRAINJOB_TEST_HOOKS=hooks_file(tmp_path, **SMALL_STAND_IN,
                                                hold={f"epoch:{pause_after}": 600}))
        proc = start_trainjob(args, env, tmp_path / name, log)  # a new pod each time
        wait_for(lambda: stored_json(s3, bucket, prefix).get("epochs_done", 0) >= epochs_done,
                  proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return log.read_text()

    first = run_until(1, 0, "first")
    assert head in first and stored_json(s3, bucket, prefix)["phase"] == "head"
    second = run_until(3, 2, "second")
    assert "resuming at epoch 1, batch 0" in second
    assert second.index(head) < second.index(full)  # resumed in phase 1, then crossed
    assert stored_json(s3, bucket, prefix)["phase"] == "full"
    assert s3.read_json(bucket, f"{prefix}/backup/state.json")["phase"] == "full"

    hooks = hooks_file(tmp_path, **SMALL_STAND_IN)
    third = run_trainjob(args, s3.env(TRAINJOB_TEST_HOOKS=hooks), tmp_path / "third")
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-3000:]
    assert "resuming at epoch 3, batch 0" in third.stdout
    assert full in third.stdout and "phase head" not in third.stdout
    assert csv_epochs(s3, bucket, prefix) == [0, 1, 2, 3]
    history = s3.read_json(bucket, f"{prefix}/history.json")
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert [h["phase"] for h in history] == ["head", "head", "full", "full"]
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert json.loads(s3.read(bucket, f"{prefix}/status.json"))["state"] == "succeeded"


def test_recipe_command_lines_parse(monkeypatch):
    """docs/recipes.md: every `trainjob train` command line uses real options, valid values."""
    import os
    import shlex
    from pathlib import Path

    from trainjob.cli import train

    text = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    commands = [" ".join(block.replace("\\\n", " ").split())
                for block in text.split("```")[1::2] if block.strip().startswith("trainjob")]
    assert len(commands) == 3
    for name in [n for n in os.environ if n.startswith("TRAINJOB_")]:
        monkeypatch.delenv(name)
    for command in commands:
        args = shlex.split(command)[2:]
        ctx = train.make_context("train", args)
        cfg = Config.from_options(**ctx.params)
        assert cfg.split.train_per_class == 30 and cfg.data.include_background
