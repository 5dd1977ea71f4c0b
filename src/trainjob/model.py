"""``build_model(cfg) -> keras.Model``: ResNet50 that takes raw 0-255 RGB images."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import tensorflow as tf
from keras import layers, ops

from trainjob.config import ModelConfig

log = logging.getLogger(__name__)

# keras.applications.resnet50.preprocess_input ("caffe" mode): BGR order, ImageNet means.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="trainjob")
class ResNetPreprocess(layers.Layer):
    """RGB 0-255 -> ResNet50's input. Lives in the model so model.keras needs no extra code."""

    def call(self, inputs):
        bgr = ops.flip(inputs, axis=-1)
        return bgr - ops.convert_to_tensor(IMAGENET_BGR_MEAN, dtype=bgr.dtype)


def gpus() -> list:
    return tf.config.list_physical_devices("GPU")


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "mixed_float16" if gpus() else "float32"
    return precision


def resolve_jit(jit: str) -> bool:
    # XLA pays off on GPUs; on CPUs it was measured 2-4x slower for this model.
    return bool(gpus()) if jit == "auto" else jit == "on"


def build_model(cfg: ModelConfig, num_classes: int, weights_file: Path | None = None) -> keras.Model:
    """ResNet50 backbone, global average pooling, softmax head (float32 under mixed precision).

    ``weights_file`` is a fetched ``.weights.h5`` for ``--weights URI``.
    """
    keras.mixed_precision.set_global_policy(resolve_precision(cfg.precision))
    size = cfg.image_size
    inputs = keras.Input((size, size, 3), name="image")
    x = ResNetPreprocess(name="preprocess")(inputs)
    backbone = keras.applications.ResNet50(
        include_top=False, pooling="avg", input_shape=(size, size, 3),
        weights="imagenet" if cfg.weights == "imagenet" else None)
    x = backbone(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32",
                           name="predictions")(x)
    model = keras.Model(inputs, outputs, name="resnet50")
    if weights_file is not None:
        try:
            model.load_weights(weights_file)
        except (ValueError, OSError) as exc:
            from trainjob.errors import ConfigError

            raise ConfigError(f"--weights {cfg.weights}: cannot load into ResNet50 with "
                              f"{num_classes} classes at {size}px: {exc}") from exc
    return model
