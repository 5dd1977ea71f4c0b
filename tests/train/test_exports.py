"""trainjob.train.exports on a small compiled and trained model (the ResNet50 of a real run is
checked in test_resume.py): model.keras without optimizer state, and the SavedModel."""

from __future__ import annotations

import numpy as np
import pytest

from trainjob.run.folder import MODEL, SAVED_MODEL
from trainjob.train import exports


@pytest.mark.training
def test_inference_file_has_no_optimizer_and_the_same_predictions(tmp_path):
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 3)).astype("float32")
    model.fit(x, keras.utils.to_categorical(np.arange(8) % 3, 3), epochs=1, verbose=0)
    model.save(tmp_path / "with_optimizer.keras")

    exports.write_model(model, tmp_path, "saved_model")
    path = tmp_path / MODEL
    loaded = keras.saving.load_model(path)
    assert getattr(loaded, "optimizer", None) is None
    assert model.optimizer is not None  # the trained model itself keeps its optimizer
    # Adam keeps two moments per weight: the file without them is about a third.
    assert path.stat().st_size < 0.45 * (tmp_path / "with_optimizer.keras").stat().st_size
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)

    served = tf.saved_model.load(str(tmp_path / SAVED_MODEL))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, atol=1e-6)
    exports.write_model(model, tmp_path, "saved_model")  # again, over the first export
    assert (tmp_path / SAVED_MODEL / "saved_model.pb").is_file()
