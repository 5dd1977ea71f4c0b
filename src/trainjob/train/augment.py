"""The per-image ops of the input pipeline: one training image from its encoded bytes
(``train_image``), one evaluation image (``eval_image``).

Training (``--augment``): decode, a window of s*H x s*W of the original with
s ~ U(0.8, 1) at a uniform offset, a horizontal flip with p 0.5, ONE bilinear resize to
the training size, rounded to uint8. That is the region the pipeline before it cropped (80-100%
of each side of the image once squashed to the training size, uniform offset, flip p 0.5),
resampled once instead of twice: sharper, and cheaper, since the antialiased resize of every
image to the training size (61% of the old first epoch) is gone (docs/benchmarks.md).

Every random draw is a pure function of (seed, epoch, sample id): a sample gets the same
window and flip wherever it falls in the epoch, on whichever worker, before or after a
resume. Evaluation and ``trainjob predict`` keep the decode and the antialiased resize of
the whole image, bit for bit (the cache of the validation and test sets holds those).
"""

from __future__ import annotations

import tensorflow as tf

MIN_ZOOM = 0.8  # a training window keeps at least 80% of each side
# The JPEG decoder's accurate IDCT: TensorFlow's default (the fast one) is up to 8 levels off
# the colours Pillow (and libjpeg's default) decode, at sharp edges; it costs no measurable
# time here.
JPEG_IDCT = "INTEGER_ACCURATE"


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """uint8 RGB pixels of one encoded image: a JPEG or, as ``data.images.check_image``
    leaves the other formats, a PNG (grayscale becomes three equal channels)."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=JPEG_IDCT),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def round_to_uint8(image: tf.Tensor) -> tf.Tensor:
    """``to_uint8`` of pixels already within [0, 255], as a bilinear resize of uint8 pixels
    leaves them (each is a weighted mean of four): the same bytes without the clip's two
    passes over the image."""
    return tf.cast(tf.round(image), tf.uint8)


def eval_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """The whole image at image_size x image_size, antialiased: what evaluation, the
    validation stream and ``trainjob predict`` see."""
    return to_uint8(tf.image.resize(decode(encoded), [image_size, image_size], antialias=True))


def train_image(encoded: tf.Tensor, sample_id: tf.Tensor, epoch: tf.Tensor, *, seed: int,
                image_size: int, augment: bool, draw: tf.Tensor | int = 0) -> tf.Tensor:
    """One training image (uint8, image_size x image_size x 3) from its encoded bytes.

    ``augment``: the random window and flip of (``seed``, ``epoch``, ``sample_id``), then
    one bilinear resize; otherwise the whole image, bilinear. ``draw`` tells apart the
    times one sample is drawn within an epoch (> 0 only where an epoch wraps the data, as
    with ``--steps-per-epoch`` or several workers), so that each gets its own window."""
    image = decode(encoded)
    if augment:
        flip, *window = tf.unstack(sample_seeds(seed, epoch, sample_id, draw))
        shape = tf.shape(image)
        y, x, height, width = crop_window(shape[0], shape[1], window)
        image = tf.image.stateless_random_flip_left_right(
            image[y:y + height, x:x + width], flip)
    return round_to_uint8(tf.image.resize(image, [image_size, image_size]))


def train_batch(encoded: tf.Tensor, sample_ids: tf.Tensor, draws: tf.Tensor, epoch: tf.Tensor,
                *, seed: int, image_size: int, augment: bool) -> tf.Tensor:
    """``train_image`` of each element of a batch (encoded bytes, sample ids and draws, all
    of shape [n]), stacked: uint8 [n, image_size, image_size, 3], the same bytes.

    One tf.data call per batch instead of one per image: each tf.data element costs tens of
    microseconds of hand-offs between threads, map_fn's loop less. Side by side, the
    classic path's first epoch ran 0.97-1.07x as fast so; the packed path, which parses its
    records in the same call, 0.93x, and keeps one image per call (docs/benchmarks.md)."""
    return tf.map_fn(
        lambda e: train_image(e[0], e[1], epoch, seed=seed, image_size=image_size,
                              augment=augment, draw=e[2]),
        (encoded, sample_ids, draws),
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8))


def sample_seeds(seed: int, epoch: tf.Tensor, sample_id: tf.Tensor,
                 draw: tf.Tensor | int = 0) -> tf.Tensor:
    """Four stateless seeds (flip, scale, top, left), shape [4, 2], of one sample's draw."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.constant(20, tf.int64)])  # 20: this op's own
    for value in (epoch, sample_id, draw):
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return tf.random.experimental.stateless_split(key, 4)


def crop_window(height: tf.Tensor, width: tf.Tensor, seeds: list[tf.Tensor],
                min_zoom: float = MIN_ZOOM) -> tuple[tf.Tensor, ...]:
    """(top, left, height, width) of a window keeping a fraction s ~ U(min_zoom, 1) of each
    side (the same s for both), at a uniform offset."""
    scale_seed, top_seed, left_seed = seeds
    scale = tf.random.stateless_uniform([], scale_seed, min_zoom, 1.0)
    h = tf.maximum(1, tf.cast(tf.round(scale * tf.cast(height, tf.float32)), tf.int32))
    w = tf.maximum(1, tf.cast(tf.round(scale * tf.cast(width, tf.float32)), tf.int32))
    top = tf.random.stateless_uniform([], top_seed, 0, height - h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, width - w + 1, dtype=tf.int32)
    return top, left, h, w
