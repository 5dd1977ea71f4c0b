"""model.py: ResNet50 with preprocessing inside, precision and XLA choices."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainjob.config import ModelConfig
from trainjob.train import model as models
from trainjob.train.weights import MODEL, InitialWeights


@pytest.fixture(autouse=True)
def _float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_preprocessing_matches_keras_resnet50_preprocess_input():
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = np.asarray(models.ResNetPreprocess()(images))
    reference = keras.applications.resnet50.preprocess_input(images.copy())
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)


def test_model_takes_raw_images_and_round_trips_through_keras_file(tmp_path):
    model = models.build_model(ModelConfig(image_size=32), num_classes=3)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 3)
    assert any(isinstance(layer, models.ResNetPreprocess) for layer in model.layers)
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    before = model.predict(images, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), before, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(before.sum(axis=1), 1.0, atol=1e-5)


def test_mixed_precision_keeps_a_float32_output():
    model = models.build_model(ModelConfig(image_size=32, precision="mixed_float16"), 4)
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert model.get_layer("predictions").dtype_policy.compute_dtype == "float32"
    assert model.output.dtype == "float32"


def test_auto_choices_on_a_cpu_machine():
    assert models.gpus() == []  # the test machines have no GPU
    assert models.resolve_precision("auto") == "float32"
    assert models.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert models.resolve_jit("auto") is False
    assert models.resolve_jit("on") is True


def test_weights_file_is_loaded_and_a_mismatch_is_a_config_error(tmp_path):
    from trainjob.errors import ConfigError

    donor = models.build_model(ModelConfig(image_size=32), num_classes=3)
    path = tmp_path / "donor.weights.h5"
    donor.save_weights(path)
    full = InitialWeights(MODEL, path)
    model = models.build_model(ModelConfig(image_size=32, weights=str(path)), 3, full)
    for a, b in zip(model.get_weights(), donor.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="cannot load"):
        models.build_model(ModelConfig(image_size=32, weights=str(path)), 5, full)


def test_the_test_stand_in_has_resnet50s_bytes_and_only_under_its_hook(tmp_path, monkeypatch):
    """The stand-in backbone (a test hook) stands for ResNet50 in the store's tests: its
    checkpoints must be as big, and it must be the backbone the rest of the job knows."""
    import json

    from trainjob.hooks import ENV

    real = models.build_model(ModelConfig(image_size=32), num_classes=3)
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps({"stand_in_backbone": True}))
    monkeypatch.setenv(ENV, str(hooks))
    stand_in = models.build_model(ModelConfig(image_size=32), num_classes=3)
    resnet, small = models.backbone_of(real), models.backbone_of(stand_in)
    assert len(resnet.layers) > 100 and len(small.layers) < 10
    assert small.output_shape == resnet.output_shape == (None, models.FEATURES)
    assert abs(stand_in.count_params() - real.count_params()) < 1e-3 * real.count_params()
    sizes = []
    for name, model in (("real", real), ("stand_in", stand_in)):
        path = tmp_path / f"{name}.weights.h5"
        model.save_weights(path)
        sizes.append(path.stat().st_size)
    assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[0], sizes
    # The small one ("small"): the same layers and output, under a hundredth of the weights.
    hooks.write_text(json.dumps({"stand_in_backbone": "small"}))
    little = models.backbone_of(models.build_model(ModelConfig(image_size=32), num_classes=3))
    assert [type(x) for x in little.layers] == [type(x) for x in small.layers]
    assert little.output_shape == small.output_shape
    assert little.count_params() < 1e-2 * small.count_params()


@pytest.mark.training  # it fits: make test only
@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_the_model_takes_the_training_streams_uint8_pixels(precision):
    """training_stream hands out uint8 pixels; the model casts them to its float32 input
    (on the accelerator, where there is one): the same answers as float32 pixels, and a
    training step on them."""
    import tensorflow as tf

    model = models.build_model(ModelConfig(image_size=32, precision=precision), num_classes=3)
    pixels = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    as_float = np.asarray(model(pixels.astype(np.float32), training=False))
    np.testing.assert_allclose(np.asarray(model(tf.constant(pixels), training=False)),
                               as_float, rtol=1e-5, atol=1e-6)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    stream = tf.data.Dataset.from_tensors((pixels, np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]))
    loss = model.fit(stream, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss)
