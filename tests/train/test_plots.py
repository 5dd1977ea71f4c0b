"""The test split's pictures and figures: confusion matrix, top confusions, confusion.png
and per_class.png (readable at 101 classes: sized by the class count)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainjob.inspect import runinfo
from trainjob.run.folder import CONFUSION, PER_CLASS, RUN_ENTRIES
from trainjob.train import plots


def test_confusion_matrix_rows_are_true_classes_and_normalize_per_row():
    m = plots.confusion_matrix(np.array([0, 1, 1, 2, 2, 2]), np.array([0, 0, 1, 2, 2, 0]), 4)
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    norm = plots.normalize_rows(m)
    assert norm[2].tolist() == pytest.approx([1 / 3, 0, 2 / 3, 0])
    assert norm[3].tolist() == [0, 0, 0, 0]  # a class absent from the test split


def test_evaluate_records_the_matrix_and_top_confusions_runs_show_reads():
    import tensorflow as tf

    from trainjob.train import evaluation

    import keras

    class Given(keras.Model):  # its answers are its inputs: the stream holds them
        def call(self, x):
            return x

    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1],
                      [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]], "float32")
    labels = np.eye(3, dtype="float32")[[0, 1, 1, 1, 2, 2]]
    m = evaluation.evaluate(Given(), tf.data.Dataset.from_tensor_slices((probs, labels)).batch(4),
                            ["x", "y", "z"])
    assert m["confusion_matrix"] == [[1, 0, 0], [2, 1, 0], [0, 1, 1]]
    assert m["top_confusions"] == [{"true": "y", "predicted": "x", "count": 2},
                                   {"true": "z", "predicted": "y", "count": 1}]
    # runs show derives the same list from the matrix it finds in metrics.json.
    names = {"0": "x", "1": "y", "2": "z"}
    assert runinfo.top_confusions(m, names) == m["top_confusions"]


def test_pictures_of_101_classes_have_room_for_every_label(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"class_{i:03d}_{'long' * (i % 5)}" for i in range(101)]
    labels = rng.integers(0, 101, 3000)
    predicted = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, 101, 3000))
    matrix = plots.confusion_matrix(labels, predicted, 101)
    per_class = {n: float(matrix[i, i] / matrix[i].sum()) for i, n in enumerate(names)}
    plots.plot_test_split({"confusion_matrix": matrix.tolist(), "per_class_accuracy": per_class},
                          names, tmp_path)
    # A 7-point label is about 10 px tall at 100 dpi: 20 px a class keeps 101 labels apart
    # (a literal, not the code's own constants, which the bound would follow down).
    row_pixels = 20
    with Image.open(tmp_path / CONFUSION) as image:
        assert image.height >= 101 * row_pixels and image.width >= 101 * row_pixels
    with Image.open(tmp_path / PER_CLASS) as image:
        assert image.height >= 101 * row_pixels
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10  # drawn, not blank
    assert {CONFUSION, PER_CLASS} <= set(RUN_ENTRIES)  # --overwrite removes them too


def test_no_pictures_for_an_empty_test_split(tmp_path):
    plots.plot_test_split({"test_images": 0}, ["a", "b"], tmp_path)
    assert not list(tmp_path.iterdir())
