"""``build_model(cfg) -> keras.Model``: ResNet50 that takes raw 0-255 RGB images."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import keras
import tensorflow as tf
from keras import layers, ops

from trainjob.config import ModelConfig
from trainjob.errors import ConfigError
from trainjob.hooks import read_hooks
from trainjob.train.weights import BACKBONE, InitialWeights

log = logging.getLogger(__name__)

# keras.applications.resnet50.preprocess_input ("caffe" mode): BGR order, ImageNet means.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
BACKBONE_LAYER = "resnet50"  # keras.applications.ResNet50's own name, inside the model
FEATURES = 2048  # ResNet50's pooled features
# The test stand-in's hidden width: 2057 weights per unit, so that it holds as many weights
# as ResNet50 without its top (23,587,712), within a thousandth.
STAND_IN_WIDTH = 11466
# The "small" stand-in's: for tests whose subject is not the bytes (several workers, the
# fine-tuning phases), where ResNet50's 94 MB of gradients and checkpoints only cost CPU.
SMALL_STAND_IN_WIDTH = 16


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


def build_model(cfg: ModelConfig, num_classes: int,
                initial: InitialWeights | None = None) -> keras.Model:
    """ResNet50 backbone, global average pooling, softmax head (float32 under mixed precision).

    ``initial`` is the resolved ``--weights`` file: a full model, or a backbone only (the
    head then starts fresh).
    """
    keras.mixed_precision.set_global_policy(resolve_precision(cfg.precision))
    size = cfg.image_size
    inputs = keras.Input((size, size, 3), name="image")
    x = ResNetPreprocess(name="preprocess")(inputs)
    stand_in = read_hooks().get("stand_in_backbone")
    backbone = (stand_in_backbone(size, small=stand_in == "small") if stand_in
                else keras.applications.ResNet50(include_top=False, pooling="avg",
                                                 input_shape=(size, size, 3), weights=None))
    x = backbone(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32",
                           name="predictions")(x)
    model = keras.Model(inputs, outputs, name="resnet50")
    if initial is not None:
        try:
            if initial.kind == BACKBONE:
                load_backbone(backbone, initial.path)
            else:
                load_full(model, initial.path)
        except (ValueError, OSError, KeyError) as exc:
            raise ConfigError(f"--weights {cfg.weights}: cannot load into ResNet50 with "
                              f"{num_classes} classes at {size}px: {exc}") from exc
    return model


def stand_in_backbone(size: int, small: bool = False) -> keras.Model:
    """Tests only (the ``stand_in_backbone`` hook): ResNet50's bytes at a sliver of its cost.

    Tests whose subject is the store, the lock or the uploader need checkpoints and resume
    pairs of ResNet50's size (upload times, multipart, a flush under a signal), not its
    compute: this traces in about a second, and a step costs a fraction of ResNet50's. It
    has the same name, output and kinds of layer (convolution, BatchNorm, dense), so
    freezing, phases and checkpoints treat it as they treat ResNet50. ``small`` (the hook's
    value "small") keeps the layers and drops the bytes.
    """
    log.warning("test hook: a stand-in backbone with %s, not ResNet50",
                "few weights" if small else "ResNet50's weight count")
    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, strides=4, padding="same")(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(SMALL_STAND_IN_WIDTH if small else STAND_IN_WIDTH, activation="relu")(x)
    outputs = layers.Dense(FEATURES, activation="relu")(x)
    return keras.Model(inputs, outputs, name=BACKBONE_LAYER)


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_LAYER)


def load_backbone(backbone: keras.Model, path: Path) -> None:
    """Keras' no-top file (legacy HDF5 layout), by layer name, into the backbone alone."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "r") as f:
        legacy_h5_format.load_weights_from_hdf5_group(f, backbone)


def load_full(model: keras.Model, path: Path) -> None:
    """A trainjob model's weights, whatever the file is called (Keras goes by the name)."""
    if path.name.endswith(".weights.h5"):
        model.load_weights(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "model.weights.h5"
        link.symlink_to(path.absolute())
        model.load_weights(link)
