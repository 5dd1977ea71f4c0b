"""trainer.py and callbacks.py with a tiny model: metrics, schedules, the callback list,
and RunKeeper's resume state (callback state, optimizer, NaN, signals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from trainjob.config import Config
from trainjob.data.catalog import Catalog, Dataset, Sample, Splits
from trainjob.errors import Preempted, TrainingError
from trainjob.run import savepoints
from trainjob.run.folder import LocalStore, RunFolder
from trainjob.run.state import RunState
from trainjob.run.stop import StopSignal
from trainjob.train import callbacks as cb
from trainjob.train import evaluation, trainer


def _cfg(**overrides) -> Config:
    return Config.from_options(data="/data", output="/out", **overrides)


def _tiny(classes: int = 3) -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(classes, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def _data(n: int = 32, classes: int = 3):
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    x = np.eye(4)[y] + rng.normal(0, 0.1, (n, 4))
    return x.astype("float32"), keras.utils.to_categorical(y, classes)


@pytest.fixture
def run(tmp_path):
    with RunFolder(tmp_path / "run", LocalStore(tmp_path / "run")) as folder:
        yield folder


def _keeper(run, stop=None, restore=None, steps=4, every=0):
    state = RunState(run, history=[], fingerprint={"k": 1}, restore=restore,
                     stop=stop or StopSignal())
    return cb.RunKeeper(state, steps_per_epoch=steps, backup_every_steps=every)


def test_evaluate_reports_mean_per_class_accuracy():
    class Fixed(keras.Model):
        def call(self, x):
            return x

    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    model = Fixed()
    import tensorflow as tf

    labels = np.eye(3, dtype="float32")[[0, 1, 1, 2]]  # the labels come with the images
    ds = tf.data.Dataset.from_tensor_slices((probs.astype("float32"), labels)).batch(2)
    m = evaluation.evaluate(model, ds, ["x", "y", "z"])
    assert m["test_images"] == 4
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class_accuracy"] == {"x": 1.0, "y": 0.5, "z": 1.0}
    assert m["mean_per_class_accuracy"] == pytest.approx(2.5 / 3)
    assert m["top5_accuracy"] == 1.0
    expected = -np.mean(np.log([0.9, 0.7, 0.3, 0.8]))
    assert m["loss"] == pytest.approx(expected, rel=1e-5)


def _headed(bias: list[float] | None = None) -> keras.Model:
    """_tiny's model with its head set by hand: the identity on _data's one-hot inputs (it
    answers right), or a bias that outweighs them (it answers that class whatever it sees)."""
    model = _tiny()
    kernel = np.eye(4, 3, dtype="float32") * 10
    if bias is not None:
        kernel[:] = 0
    model.layers[-1].set_weights([kernel, np.array(bias or [0, 0, 0], "float32")])
    return model


def test_evaluate_warns_when_the_answers_collapse_to_one_class(caplog):
    import tensorflow as tf

    x, y = _data(30)
    assert max(np.bincount(y.argmax(1))) < 15  # the truth is spread over the three
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    names = ["red", "green", "blue"]
    caplog.set_level("WARNING", logger="trainjob.train.trainer")
    m = evaluation.evaluate(_headed(bias=[0, 5, 0]), ds, names)
    assert m["answers"]["collapsed"] is True and m["answers"]["classes_answered"] == 1
    assert (m["answers"]["top_class"], m["answers"]["top_share"]) == ("green", 1.0)
    [warning] = m["warnings"]
    assert "collapsed" in warning and "'green' for 100% of the test images" in warning
    assert "\n" not in warning and warning in caplog.text
    caplog.clear()
    learned = evaluation.evaluate(_headed(), ds, names)
    assert learned["accuracy"] == 1.0
    assert learned["answers"]["collapsed"] is False and learned["warnings"] == []
    assert "collapsed" not in caplog.text


@pytest.mark.parametrize("truth, answers, collapsed", [
    ([6, 6, 6], [18, 0, 0], True),      # one class for everything
    ([6, 6, 6], [13, 5, 0], True),      # more than twice the largest class, over half
    ([6, 6, 6], [12, 0, 6], False),     # two classes merged: a bad model, not a collapse
    ([18, 2], [20, 0], False),          # the truth itself is one class, nearly
    ([50] * 10, [260, 240] + [0] * 8, True),       # two of ten, one over half
    ([50] * 10, [200, 200, 100] + [0] * 7, False),  # three of ten, none over half: the limit
])
def test_the_collapse_rule(truth, answers, collapsed):
    """More than half the answers, and more than twice the largest true class (counts)."""
    assert sum(truth) == sum(answers)
    labels = np.repeat(np.arange(len(truth)), truth)
    predicted = np.repeat(np.arange(len(answers)), answers)
    names = [f"c{i}" for i in range(len(truth))]
    assert evaluation.answer_spread(labels, predicted, names)["collapsed"] is collapsed


def test_exp_decay_is_the_reference_scheduler():
    schedule = cb.exp_decay(1e-3)
    assert schedule(0, 5.0) == 1e-3 and schedule(9, 5.0) == 1e-3
    for epoch in (10, 11, 25):
        assert schedule(epoch, 5.0) == pytest.approx(1e-3 * math.exp(0.1 * (10 - epoch)))


def test_balanced_class_weights():
    train = [Sample("a", 0)] * 6 + [Sample("b", 1)] * 2
    counts = Dataset(Catalog(Path("/x"), ["a", "b", "c"], train), Splits(train, [], []),
                     {}).train_class_counts()
    assert counts == [6, 2, 0]
    weights = trainer.class_weights(counts, "balanced")
    assert weights[0] == pytest.approx(8 / (3 * 6)) and weights[1] == pytest.approx(8 / (3 * 2))
    assert weights[2] == 0.0
    assert trainer.class_weights(counts, "none") is None


def test_callback_list_follows_the_options(run):
    keeper = _keeper(run)
    names = [type(c).__name__ for c in cb.make_callbacks(_cfg(), run, keeper)]
    assert names[-1] == "RunKeeper"
    assert names.count("WeightsCheckpoint") == 2
    assert {"CSVLogger", "EarlyStopping", "ReduceLROnPlateau"} <= set(names)
    names = [type(c).__name__ for c in cb.make_callbacks(
        _cfg(early_stopping_patience=0, lr_schedule="exp-decay"), run, _keeper(run))]
    assert "EarlyStopping" not in names and "ReduceLROnPlateau" not in names
    assert "LearningRateScheduler" in names


@pytest.mark.training
def test_compile_model_builds_the_metrics_so_the_first_step_is_traced_once():
    """Metric variables created inside the first traced step make TensorFlow trace the
    whole step again: for ResNet50 that was a third of a job's start-up."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    trainer.compile_model(model, _cfg(), 3)
    model.optimizer.build(model.trainable_variables)  # as trainer.enter_phase does
    traces = []
    step = model.train_step
    model.train_step = lambda data: traces.append(1) or step(data)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert len(traces) == 1
    model.compile(optimizer=model.optimizer, loss="categorical_crossentropy",
                  metrics=["accuracy"])
    traces.clear()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert len(traces) == 2  # what plain Keras does: the assertion above can fail


@pytest.mark.training
def test_resume_state_restores_callbacks_and_optimizer(run, tmp_path, monkeypatch):
    """What Keras' BackupAndRestore forgets: EarlyStopping/ReduceLROnPlateau/checkpoint state.

    The monitored metric is scripted to improve, then worsen (best 0.5 at epoch 1, 0.7 at
    epoch 2), so each callback ends with ``wait`` 1: a real loss keeps improving here, and
    a ``wait`` of 0 on both sides would hide one that is never restored."""
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps({"metrics": {"scripted": [1.0, 0.5, 0.7]}}))
    monkeypatch.setenv("TRAINJOB_TEST_HOOKS", str(hooks))
    x, y = _data()
    cfg = _cfg(early_stopping_patience=5, early_stopping_monitor="scripted",
               early_stopping_mode="min", reduce_lr_monitor="scripted", reduce_lr_mode="min",
               reduce_lr_patience=5, checkpoint_monitor="scripted", checkpoint_mode="min")
    model = _tiny()
    keeper = _keeper(run, steps=4)
    callbacks = cb.make_callbacks(cfg, run, keeper)
    model.fit(x, y, batch_size=8, epochs=3, callbacks=callbacks, verbose=0)
    es = next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
    rl = next(c for c in callbacks if isinstance(c, keras.callbacks.ReduceLROnPlateau))
    assert (es.best, es.wait, es.best_epoch) == (0.5, 1, 1)
    assert (rl.best, rl.wait) == (0.5, 1)
    state = savepoints.load_state(run)
    assert state["epoch"] == 3 and state["step"] == 0
    assert state["iterations"] == 12
    assert state["callbacks"]["EarlyStopping:"]["best"] == pytest.approx(es.best)

    # A new process: fresh model and callbacks, state put back.
    model2 = _tiny()
    assert savepoints.restore_weights(model2, run, state) == 12
    for a, b in zip(model.get_weights(), model2.get_weights()):
        np.testing.assert_allclose(a, b)
    keeper2 = _keeper(run, restore=state)
    callbacks2 = cb.make_callbacks(cfg, run, keeper2)
    for c in callbacks2:
        c.set_model(model2)
        c.on_train_begin()
    es2 = next(c for c in callbacks2 if isinstance(c, keras.callbacks.EarlyStopping))
    rl2 = next(c for c in callbacks2 if isinstance(c, keras.callbacks.ReduceLROnPlateau))
    assert (es2.best, es2.wait, es2.best_epoch) == (0.5, 1, 1)
    assert (rl2.best, rl2.wait) == (0.5, 1)
    best = next(c for c in callbacks2 if isinstance(c, cb.WeightsCheckpoint) and c.save_best_only)
    assert best.best == 0.5


@pytest.mark.training
def test_checkpoints_hold_weights_without_optimizer_state(run):
    import h5py

    x, y = _data()
    model = _tiny()
    model.fit(x, y, epochs=1, callbacks=cb.make_callbacks(_cfg(checkpoint_monitor="loss"), run,
                                                          _keeper(run)), verbose=0)
    with h5py.File(run.path("checkpoints/last.weights.h5")) as f:
        assert "optimizer" not in f
    with h5py.File(run.path(savepoints.weights_of(savepoints.load_state(run)))) as f:
        assert "optimizer" in f  # the resume state carries it
    fresh = _tiny()
    cb.load_model_weights(fresh, run.path("checkpoints/last.weights.h5"))
    np.testing.assert_allclose(fresh.get_weights()[0], model.get_weights()[0])


@pytest.mark.training
def test_nan_loss_is_a_training_error_without_a_partial_epoch(run):
    x, y = _data()
    x[5] = np.nan
    with pytest.raises(TrainingError, match="loss became nan"):
        _tiny().fit(x, y, batch_size=8, epochs=2, callbacks=[_keeper(run)], verbose=0)
    assert savepoints.load_state(run) is None  # nothing recorded for the broken epoch


@pytest.mark.training
def test_stop_signal_raises_preempted_and_saves_a_mid_epoch_point(run):
    x, y = _data(64)
    stop = StopSignal()

    class Trip(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                stop.requested_at = 0.0  # as the SIGTERM handler does

    model = _tiny()
    with pytest.raises(Preempted):
        model.fit(x, y, batch_size=8, epochs=2,
                  callbacks=[Trip(), _keeper(run, stop=stop, steps=8, every=100)], verbose=0)
    state = savepoints.load_state(run)
    assert state["epoch"] == 0 and state["step"] == 3 and state["iterations"] == 3


MIRRORED = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from trainjob.train import trainer
from trainjob.config import Config
strategy = trainer.make_strategy(["/cpu:0", "/cpu:1"])
assert isinstance(strategy, tf.distribute.MirroredStrategy), strategy
assert strategy.num_replicas_in_sync == 2
cfg = Config.from_options(data="/d", output="/o", epochs=2)
with strategy.scope():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    trainer.compile_model(model, cfg, 3)
x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 3)).astype("float32")
y = keras.utils.to_categorical(np.arange(16) % 3, 3)
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
trainer.fit(model, ds, val_ds=None, cfg=cfg, steps=2, initial_epoch=0, epochs=2,
             callbacks=[], weights=None)
assert int(model.optimizer.iterations.numpy()) == 4
print("MIRRORED-OK")
"""


@pytest.mark.training
def test_mirrored_strategy_over_two_devices_trains():
    """More than one device: MirroredStrategy, with our compile and fit (on 2 logical CPUs,
    as the test machines have no GPUs)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True,
                          timeout=300)
    assert "MIRRORED-OK" in proc.stdout, proc.stderr[-3000:]


def test_one_device_uses_the_default_strategy():
    import tensorflow as tf

    assert trainer.make_strategy(["/cpu:0"]) is tf.distribute.get_strategy()
    assert not isinstance(trainer.make_strategy(), tf.distribute.MirroredStrategy)


MIRRORED_RESUME = """
import sys
from pathlib import Path
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from trainjob.train import callbacks as cb, trainer
from trainjob.run import savepoints
from trainjob.run.folder import RunFolder
from trainjob.run.stop import StopSignal
from trainjob.config import Config
from trainjob.run.state import RunState
from trainjob.store.local import LocalStore

cfg = Config.from_options(data="/d", output="/o", epochs=2)
x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 3)).astype("float32")
y = keras.utils.to_categorical(np.arange(16) % 3, 3)
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()

def build(strategy):
    # As job.py does: build, compile and restore inside the strategy's scope.
    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(3, activation="softmax")])
        trainer.compile_model(model, cfg, 3)
    return model

def fit(model, run, restore, first, last):
    state = RunState(run, fingerprint={}, history=[], stop=StopSignal(), restore=restore)
    trainer.fit(model, ds, val_ds=None, cfg=cfg, steps=2, initial_epoch=first, epochs=last,
                 callbacks=[cb.RunKeeper(state, steps_per_epoch=2)], weights=None)

root = Path(sys.argv[1])
with RunFolder(root, LocalStore(root)) as run:
    strategy = trainer.make_strategy(["/cpu:0", "/cpu:1"])
    first = build(strategy)
    fit(first, run, None, 0, 1)
    record = savepoints.load_state(run)
    # A new process would make a new strategy and model; restore inside its scope.
    strategy2 = trainer.make_strategy(["/cpu:0", "/cpu:1"])
    second = build(strategy2)
    with strategy2.scope():
        assert savepoints.restore_weights(second, run, record) == 2
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first.optimizer.variables, second.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fit(second, run, record, 1, 2)
    assert int(second.optimizer.iterations.numpy()) == 4
    assert savepoints.load_state(run)["epoch"] == 2
print("MIRRORED-RESUME-OK")
"""


@pytest.mark.training
def test_resume_under_mirrored_strategy(tmp_path):
    """Resume state saved under MirroredStrategy restores into a new strategy's model (the
    optimizer's slots built inside its scope), and training continues from there."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MIRRORED_RESUME, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert "MIRRORED-RESUME-OK" in proc.stdout, proc.stderr[-3000:]


# --- recalibrate_batchnorm ("precise BN") ----------------------------------------------------

def _bn_model() -> keras.Model:
    """A nested model (as ResNet50 sits in ours) with two trained BatchNorm layers, one frozen
    between them, and random weights: every layer's output depends on the ones before."""
    inner_in = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 1, name="conv")(inner_in)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    inner = keras.Model(inner_in, keras.layers.ReLU()(x), name="backbone")
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.GlobalAveragePooling2D()(inner(inputs))
    x = keras.layers.Dense(6, name="d1")(x)
    x = keras.layers.BatchNormalization(name="frozen")(x)
    x = keras.layers.Dense(4, name="d2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.get_layer("frozen").trainable = False
    rng = np.random.default_rng(1)
    for v in model.weights:  # positive variances; moving statistics far from any batch's
        low = -1.0 if "kernel" in v.path or "mean" in v.path or "beta" in v.path else 0.5
        v.assign(rng.uniform(low, 1.5, v.shape).astype("float32"))
    return model


def _bn_statistics(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    """bn1's and bn2's batch (mean, variance) for the batch ``x``, in numpy (float64): the
    forward pass of training mode, the frozen layer in inference mode."""
    def weights(name: str, inner: bool = False) -> list[np.ndarray]:
        owner = model.get_layer("backbone") if inner else model
        return [np.asarray(w, np.float64) for w in owner.get_layer(name).get_weights()]

    def normalize(h, mean, var, gamma, beta, eps=1e-3):
        return (h - mean) / np.sqrt(var + eps) * gamma + beta

    kernel, bias = weights("conv", inner=True)
    h = np.einsum("nhwc,cd->nhwd", x.astype(np.float64), kernel[0, 0]) + bias
    m1, v1 = h.mean((0, 1, 2)), h.var((0, 1, 2))  # Keras' variance: biased, as here
    gamma, beta, _, _ = weights("bn1", inner=True)
    h = np.maximum(normalize(h, m1, v1, gamma, beta), 0).mean((1, 2))
    kernel, bias = weights("d1")
    gamma, beta, moving_mean, moving_var = weights("frozen")
    h = normalize(h @ kernel + bias, moving_mean, moving_var, gamma, beta)
    kernel, bias = weights("d2")
    h = h @ kernel + bias
    return [m1, v1, h.mean(0), h.var(0)]


def _expected(model: keras.Model, x: np.ndarray, batch: int, batches: int) -> list[np.ndarray]:
    each = [_bn_statistics(model, x[i * batch:(i + 1) * batch]) for i in range(batches)]
    return [np.mean(stats, axis=0) for stats in zip(*each)]


def _moving(model: keras.Model) -> list[np.ndarray]:
    layers = [model.get_layer("backbone").get_layer("bn1"), model.get_layer("bn2")]
    return [np.asarray(v) for layer in layers for v in (layer.moving_mean, layer.moving_variance)]


@pytest.mark.training
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_recalibrate_batchnorm_averages_the_batch_statistics(policy):
    """Each trained layer's moving mean and variance become the average, over the batches,
    of its batch statistics computed in numpy; the remainder batch is left out; the frozen
    layer and every other weight stay as they were; float32 under mixed precision too."""
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _bn_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = np.random.default_rng(2).uniform(-2, 2, (21, 4, 4, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(21) % 3, 3)
    frozen = [np.asarray(v) for v in model.get_layer("frozen").weights]
    others = {v.path: np.asarray(v) for v in model.weights if "moving" not in v.path}
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if policy == "float32" else {"rtol": 2e-2,
                                                                          "atol": 2e-2}

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # 8, 8 and a remainder of 5
    assert evaluation.recalibrate_batchnorm(model, ds, max_batches=10) == 2
    expected = _expected(model, x, 8, 2)
    for got, want in zip(_moving(model), expected):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, **tolerance)
    # Not what one batch alone, or all 21 images as one batch, would give.
    assert not np.allclose(expected[1], _expected(model, x, 8, 1)[1], rtol=1e-2)
    assert not np.allclose(expected[3], _bn_statistics(model, x)[3], rtol=1e-2)
    for v, before in zip(model.get_layer("frozen").weights, frozen):
        np.testing.assert_array_equal(np.asarray(v), before)
    for v in model.weights:
        if "moving" not in v.path:
            np.testing.assert_array_equal(np.asarray(v), others[v.path])

    assert evaluation.recalibrate_batchnorm(model, ds, max_batches=1) == 1  # the budget
    for got, want in zip(_moving(model), _expected(model, x, 8, 1)):
        np.testing.assert_allclose(got, want, **tolerance)
    only = tf.data.Dataset.from_tensor_slices(x[:5]).batch(8)  # images alone, one short batch
    assert evaluation.recalibrate_batchnorm(model, only, max_batches=10) == 1
    for got, want in zip(_moving(model), _expected(model, x[:5], 5, 1)):
        np.testing.assert_allclose(got, want, **tolerance)


def test_recalibrate_batchnorm_leaves_a_model_without_trained_batchnorm_alone():
    import tensorflow as tf

    model = _bn_model()
    for name in ("bn2", "frozen"):
        model.get_layer(name).trainable = False
    model.get_layer("backbone").trainable = False
    before = model.get_weights()
    ds = tf.data.Dataset.from_tensor_slices(np.ones((8, 4, 4, 3), "float32")).batch(4)
    assert evaluation.recalibrate_batchnorm(model, ds, max_batches=4) == 0
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_the_setting_states_the_image_budget():
    import dataclasses

    from trainjob.config import CallbackConfig

    [field] = [f for f in dataclasses.fields(CallbackConfig) if f.name == "recalibrate_batchnorm"]
    assert f"up to {evaluation.PRECISE_BN_IMAGES} training images" in field.metadata["help"]


MIRRORED_BN = """
import sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from trainjob.train import evaluation, trainer
model_path, data_path, out_path = sys.argv[1:]
strategy = trainer.make_strategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = keras.saving.load_model(model_path)
    try:
        evaluation.recalibrate_batchnorm(model, None, 1)
        raise AssertionError("recalibrated inside the strategy's scope")
    except RuntimeError:
        pass
variable = model.get_layer("bn2").moving_mean.value
assert isinstance(variable, tf.distribute.DistributedValues), type(variable)
x = np.load(data_path)
ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
assert evaluation.recalibrate_batchnorm(model, ds, max_batches=10) == 2
# Each replica's copy of each statistic, as the next replicated step would read it.
layers = [model.get_layer("backbone").get_layer("bn1"), model.get_layer("bn2"),
          model.get_layer("frozen")]
out = {f"{i}_{j}_{k}": np.asarray(component)
       for i, layer in enumerate(layers)
       for j, v in enumerate((layer.moving_mean, layer.moving_variance))
       for k, component in enumerate(v.value.values)}
np.savez(out_path, **out)
print("MIRRORED-BN-OK")
"""


@pytest.mark.training
def test_recalibrate_batchnorm_under_mirrored_strategy(tmp_path):
    """A model whose variables are a strategy's (built in its scope, as the job does): the
    passes run on a plain copy, and the averages land in every replica's copy."""
    import subprocess
    import sys

    model = _bn_model()
    model.save(tmp_path / "model.keras")
    x = np.random.default_rng(3).uniform(-2, 2, (20, 4, 4, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", MIRRORED_BN, str(tmp_path / "model.keras"),
                           str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert "MIRRORED-BN-OK" in proc.stdout, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    frozen = model.get_layer("frozen")
    want = [*_expected(model, x, 8, 2), np.asarray(frozen.moving_mean),
            np.asarray(frozen.moving_variance)]
    for index, expected in enumerate(want):
        for replica in range(2):
            np.testing.assert_allclose(out[f"{index // 2}_{index % 2}_{replica}"], expected,
                                       rtol=1e-5, atol=1e-6)
