"""The final model as published: ``model/model.keras`` for inference (no optimizer state),
and, with ``--export saved_model``, ``model/saved_model/`` for TF Serving.

Keras 3's ``.keras`` format saves a compiled model's optimizer variables and ignores
``include_optimizer`` (it is honoured for legacy ``.h5`` only). The supported way to leave
them out is to save a model that has no optimizer: a new functional ``keras.Model`` over
the same inputs and outputs, which shares the layers (and weights, with no copy) but is not
compiled (``keras.models.clone_model`` would compile its copy again). The file is then about
a third of the size (Adam keeps two moments per weight). Training continues from a finished
run with ``--weights <run>/checkpoints/last.weights.h5``; the optimizer starts afresh.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import keras

from trainjob.run.folder import MODEL, SAVED_MODEL

log = logging.getLogger(__name__)


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled model sharing ``model``'s layers and weights: no optimizer, no loss."""
    return keras.Model(inputs=model.inputs, outputs=model.outputs, name=model.name)


def save_for_inference(model: keras.Model, path: Path) -> keras.Model:
    """Write ``path`` (.keras) without optimizer state; returns the copy that was saved."""
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = inference_copy(model)
    copy.save(path)
    log.info("saved %s (%.1f MB, no optimizer state)", path, path.stat().st_size / 1e6)
    return copy


def export_saved_model(model: keras.Model, folder: Path) -> None:
    """A TensorFlow SavedModel of ``model`` (its ``serve`` endpoint takes raw 0-255 RGB
    images, float32, batch x size x size x 3, and returns the class probabilities)."""
    if folder.exists():
        shutil.rmtree(folder)  # a restart before publishing: export again from scratch
    model.export(str(folder), format="tf_saved_model", verbose=False)
    log.info("exported a SavedModel to %s", folder)


def write_model(model: keras.Model, run: Path, export: str = "none") -> None:
    """The run folder ``run``'s final model: model/model.keras, and model/saved_model/
    when ``export`` is saved_model (``--export``)."""
    save_for_inference(model, run / MODEL)
    if export == "saved_model":
        export_saved_model(model, run / SAVED_MODEL)
