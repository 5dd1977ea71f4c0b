"""augment.py: the training image (a window of 80-100% of each side, a flip, one bilinear
resize, all drawn from (seed, epoch, sample id)) and the evaluation image (the pixels
evaluation and ``trainjob predict`` saw before, bit for bit)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainjob.data.catalog import Sample
from trainjob.train import augment, inputs

H, W, S = 200, 250, 64


def _encode(image: np.ndarray, fmt: str = "PNG", **options) -> tf.Tensor:
    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **options)
    return tf.constant(out.getvalue())


def _coordinates() -> np.ndarray:
    """Red is the column (0..249) and green the row (0..199), both linear, which bilinear
    resampling keeps linear: the corners of a training image tell the window it came from."""
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = np.arange(W)[None, :]
    image[..., 1] = np.arange(H)[:, None]
    return image


def _sharp() -> np.ndarray:
    """Hard edges and fine detail, where a wrong filter or JPEG's fast IDCT shows."""
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((5, 5, 1))).astype(np.uint8)
    image[::7, :, 1] = 255
    return image


def _train(data, sample_id, epoch, seed, *, size=S, augmented=True, draw=0) -> np.ndarray:
    return augment.train_image(data, tf.constant(sample_id, tf.int64),
                               tf.constant(epoch, tf.int64), seed=seed, image_size=size,
                               augment=augmented, draw=draw).numpy()


def test_the_training_image_is_a_function_of_seed_epoch_and_sample_id():
    data = _encode(_coordinates())
    image = _train(data, 7, 3, 1)
    assert image.shape == (S, S, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, _train(data, 7, 3, 1))  # again: the same
    for other in [_train(data, 8, 3, 1), _train(data, 7, 4, 1), _train(data, 7, 3, 2),
                  _train(data, 7, 3, 1, draw=1)]:
        assert not np.array_equal(image, other)


def test_the_window_keeps_80_to_100_percent_of_each_side_at_a_uniform_offset():
    """Read each window back from the image: the first and last of S output pixels sample
    (S - 1) / S of the window's width apart, and the coordinates are linear."""
    data = _encode(_coordinates())
    fractions, flips, offsets = [], [], []
    for sample_id in range(300):
        image = _train(data, sample_id, 0, 5).astype(float)
        row, column = image[S // 2, :, 0], image[:, S // 2, 1]
        width = abs(row[-1] - row[0]) * S / (S - 1)
        height = (column[-1] - column[0]) * S / (S - 1)  # never flipped upside down
        left = min(row[0], row[-1]) - (width / S - 1) / 2
        top = column[0] - (height / S - 1) / 2
        assert 0.8 * W - 1.5 <= width <= W + 1.5 and 0.8 * H - 1.5 <= height <= H + 1.5
        assert abs(width / W - height / H) < 0.012, "one scale for both sides"
        assert -1 <= left <= W - width + 1 and -1 <= top <= H - height + 1
        fractions.append(width / W)
        flips.append(row[0] > row[-1])
        if W - width > 20:
            offsets.append(left / (W - width))
    assert min(fractions) < 0.82 and max(fractions) > 0.98
    assert 0.35 < np.mean(flips) < 0.65
    assert min(offsets) < 0.1 and max(offsets) > 0.9 and 0.35 < np.mean(offsets) < 0.65


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_without_augment_the_training_image_is_the_whole_image_bilinear(fmt):
    """Pillow's pixels (the project's promise: JPEGs with the accurate IDCT), resized once,
    bilinear, rounded; whatever the seed, epoch or id."""
    data = _encode(_sharp(), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    pillow = np.asarray(Image.open(io.BytesIO(data.numpy())).convert("RGB"))
    expected = np.clip(np.round(tf.image.resize(pillow, [S, S]).numpy()), 0, 255)
    for sample_id, epoch, seed in [(0, 0, 1), (5, 9, 2)]:
        got = _train(data, sample_id, epoch, seed, augmented=False)
        np.testing.assert_array_equal(got, expected.astype(np.uint8))
    assert not np.array_equal(got, augment.eval_image(data, S).numpy())  # not antialiased


def _decode_image_before(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """``inputs.decode_image`` as it was before the training op moved to augment.py."""
    data = tf.io.read_file(path)
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_evaluation_and_predict_pixels_are_unchanged(fmt, tmp_path):
    path = tmp_path / f"sharp.{fmt.lower()}"
    path.write_bytes(_encode(_sharp(), fmt).numpy())
    for size in (64, 224, 300):
        before = _decode_image_before(str(path), size).numpy()
        np.testing.assert_array_equal(inputs.decode_image(str(path), size).numpy(), before)
        np.testing.assert_array_equal(
            augment.eval_image(tf.io.read_file(str(path)), size).numpy(), before)
        (image, _), = inputs.decoded([Sample(str(path), 0)], size, "memory", tmp_path, "val")
        np.testing.assert_array_equal(image.numpy(), before)


def test_a_batch_is_augmented_to_the_bytes_of_each_image_alone():
    """train_batch (one tf.data call per batch) hands out exactly train_image's bytes for
    every element, with its own id and draw, whatever the sizes and formats in the batch."""
    images = [_encode(_coordinates()), _encode(_sharp(), "JPEG", quality=90),
              _encode(_sharp()[:37, :101]), _encode(np.full((9, 9, 3), 200, np.uint8), "JPEG")]
    ids, draws = [3, 11, 7, 3], [0, 0, 2, 1]
    for augmented in (True, False):
        got = augment.train_batch(tf.stack(images), tf.constant(ids, tf.int64),
                                  tf.constant(draws, tf.int64), tf.constant(4, tf.int64),
                                  seed=9, image_size=S, augment=augmented).numpy()
        assert got.shape == (4, S, S, 3) and got.dtype == np.uint8
        for k, (data, sample_id, draw) in enumerate(zip(images, ids, draws)):
            np.testing.assert_array_equal(
                got[k], _train(data, sample_id, 4, 9, augmented=augmented, draw=draw))
    assert not np.array_equal(got[0], got[3])


def test_rounding_a_bilinear_resize_needs_no_clip():
    """A bilinear resize of uint8 pixels stays within [0, 255] (each output is a weighted
    mean of four inputs), so round_to_uint8 gives to_uint8's bytes: the training images
    are the ones the pipeline made before it dropped the clip."""
    rng = np.random.default_rng(1)
    extremes = rng.choice(np.array([0, 1, 254, 255], np.uint8), (61, 83, 3))
    for image in (extremes, _sharp()):
        for size in (S, 224, 17):
            resized = tf.image.resize(image, [size, size])
            np.testing.assert_array_equal(augment.round_to_uint8(resized).numpy(),
                                          augment.to_uint8(resized).numpy())
    overshoot = tf.constant([[[-3.0, 255.7, 128.4]]])  # what the clip is for elsewhere
    assert not np.array_equal(augment.round_to_uint8(overshoot).numpy(),
                              augment.to_uint8(overshoot).numpy())
