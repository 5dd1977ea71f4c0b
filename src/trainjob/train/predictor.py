"""``trainjob predict``: class probabilities for images, from a run's final model.

The model is a run folder (its ``model/model.keras`` and ``classes.json``) or a ``.keras``
file, local or ``s3://``. Each image goes through the training path: the scan's check
(``datasets.check_image``: any mode, CMYK or TIFF converted to RGB once) and the pipeline's
decode and resize (``inputs.decode_image``), so a prediction sees the pixels evaluation
sees. A file that is no usable image is reported and the others are still predicted.
TensorFlow is imported only once there is something to predict.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainjob.data.images import IMAGE_SUFFIXES, check_image
from trainjob.errors import ConfigError, StorageError
from trainjob.run.folder import CLASSES, MODEL
from trainjob.store.base import Store
from trainjob.store.local import LocalStore
from trainjob.store.uri import open_store, parse_uri

log = logging.getLogger(__name__)

BATCH = 32


@dataclass
class Prediction:
    """One image's answer: the top classes with probabilities, or why there is none."""

    image: str
    top: list[dict[str, Any]] = field(default_factory=list)  # {"class", "index", "probability"}
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageSource:
    """An image argument resolved to one object: its display name and where it lives."""

    name: str
    store: Store
    key: str


def split_uri(uri: str) -> tuple[Store, str]:
    """(store of the folder holding ``uri``, the object's key in it)."""
    scheme, bucket, key = parse_uri(uri)
    head, _, tail = key.rstrip("/").rpartition("/")
    if scheme == "s3":
        return open_store(f"s3://{bucket}/{head}"), tail
    path = Path(key).expanduser().absolute()
    return LocalStore(path.parent), path.name


def find_images(uris: list[str], threads: int = 16) -> list[ImageSource]:
    """Every image argument as objects: a file or object as itself; a local folder or an
    s3:// prefix (a key ending in /, or one that is no object) as its files with image
    suffixes, sorted. A missing file is a source too: it fails when it is read."""
    out = []
    for uri in uris:
        scheme, _, key = parse_uri(uri)
        if scheme == "file" and Path(key).expanduser().is_dir():
            out += _listed(LocalStore(Path(key).expanduser().absolute()), uri)
        elif scheme == "s3" and (key.endswith("/") or not key):
            out += _listed(open_store(uri, threads), uri)
        else:
            store, name = split_uri(uri)
            if scheme == "s3" and store.read_info(name) is None:  # a prefix without its /
                out += _listed(open_store(uri + "/", threads), uri) or \
                    [ImageSource(uri, store, name)]
            else:
                out.append(ImageSource(uri, store, name))
    return out


def _listed(store: Store, uri: str) -> list[ImageSource]:
    base = uri.rstrip("/") + "/"
    return [ImageSource(base + o.key, store, o.key)
            for o in sorted(store.list(), key=lambda o: o.key)
            if Path(o.key).suffix.lower() in IMAGE_SUFFIXES]


def model_files(uri: str) -> tuple[Store, str, Store | None]:
    """(store, key of the .keras file in it, the run folder holding classes.json or None)
    for ``uri``: a run folder, or a .keras file (in a run folder's model/ or anywhere)."""
    trimmed = uri.rstrip("/")
    if not trimmed.endswith(".keras"):
        run = open_store(trimmed)
        return run, MODEL, run
    store, name = split_uri(trimmed)
    parent = trimmed.rpartition("/")[0]
    in_run = parent.rpartition("/")[2] == MODEL.split("/")[0]
    return store, name, split_uri(parent)[0] if in_run else None


@contextmanager
def local_model(uri: str, work_dir: Path) -> Iterator[tuple[Path, list[str] | None]]:
    """(a local .keras file, the class names from classes.json or None) for ``uri``."""
    store, name, run = model_files(uri)
    mapping = run.read_json(CLASSES) if run is not None else None
    if mapping is None and run is store:
        raise ConfigError(f"{run.child(CLASSES)} is missing: {uri} is no finished run "
                          "folder (or pass the .keras file itself)")
    classes = [str(mapping[str(i)]) for i in range(len(mapping))] if mapping else None
    with _downloads(store, work_dir) as fetch:
        yield fetch(name), classes


@contextmanager
def _downloads(store: Store, work_dir: Path) -> Iterator[Callable[[str], Path]]:
    """A function fetching keys of ``store`` to local files (local stores: the file itself)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="predict-", dir=work_dir) as tmp:
        def fetch(key: str) -> Path:
            if isinstance(store, LocalStore):
                path = store.root / key
                if not path.is_file():
                    raise ConfigError(f"{path}: no such file")
                return path
            dest = Path(tmp) / "objects" / key
            store.get(key, dest)
            return dest

        yield fetch


def predict(model_uri: str, images: list[str], *, top_k: int = 5, work_dir: Path,
            threads: int = 16, report: Callable[[Prediction], None] = lambda p: None
            ) -> list[Prediction]:
    """Top-``top_k`` classes of each image (in argument order); ``report`` hears of each
    failed image as soon as it is known. Raises for a bad model, never for a bad image."""
    if top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    sources = find_images(images, threads)
    if not sources:
        raise ConfigError(f"no images found in {', '.join(images)}")
    with local_model(model_uri, work_dir) as (model_path, classes):
        model = load_model(model_path, model_uri)
        size = int(model.input_shape[1])
        names = classes or [str(i) for i in range(int(model.output_shape[-1]))]
        results = [Prediction(s.name) for s in sources]
        with tempfile.TemporaryDirectory(prefix="predict-images-", dir=work_dir) as tmp:
            ready: list[tuple[Prediction, Path]] = []
            for source, result in zip(sources, results):
                result.error, path = _usable(source, Path(tmp), len(ready))
                if result.error:
                    report(result)
                else:
                    ready.append((result, path))
            for start in range(0, len(ready), BATCH):
                chunk = ready[start:start + BATCH]
                probs = _probabilities(model, [p for _, p in chunk], size)
                for (result, _), row in zip(chunk, probs):
                    result.top = top_classes(row, names, top_k)
    return results


def _usable(source: ImageSource, tmp: Path, n: int) -> tuple[str | None, Path | None]:
    """(None, a local file TensorFlow decodes) or (why the image is unusable, None)."""
    try:
        if isinstance(source.store, LocalStore):
            path = source.store.root / source.key
            if not path.is_file():
                return "no such file", None
        else:
            path = tmp / f"{n:06d}{Path(source.key).suffix}"
            source.store.get(source.key, path)
    except StorageError as exc:
        return str(exc), None
    (tmp / "converted").mkdir(exist_ok=True)
    checked = check_image(path, tmp / "converted")
    return (checked.reason, None) if checked.usable is None else (None, checked.usable)


def load_model(path: Path, uri: str) -> Any:
    """The .keras file at ``path``, for inference (no compile)."""
    import keras

    import trainjob.train.model  # noqa: F401 - registers the preprocessing layer

    try:
        return keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"{uri}: cannot load the model: {exc}") from exc


def _probabilities(model: Any, paths: list[Path], size: int) -> Any:
    import numpy as np
    import tensorflow as tf

    from trainjob.train.inputs import decode_image

    batch = np.stack([decode_image(tf.constant(str(p)), size).numpy() for p in paths])
    return np.asarray(model.predict(batch.astype(np.float32), verbose=0), dtype=np.float64)


def top_classes(probs: Any, names: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first (ties: lower index first)."""
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))[:k]
    return [{"class": names[i] if i < len(names) else str(i), "index": i,
             "probability": float(probs[i])} for i in order]
