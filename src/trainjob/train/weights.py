"""``--weights``: where the initial weights come from, and which kind of file they are.

``imagenet`` is Keras' published ResNet50 no-top file, cached under KERAS_HOME where Keras
caches it, and fetched (or found) before any data is downloaded. A URI or local path is
either a full trainjob model (``save_weights``' ``.weights.h5`` layout) or Keras' no-top
file (the legacy HDF5 layout, loaded into the backbone only), told apart by the file's
contents. Nothing here imports TensorFlow: a bad file fails in seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trainjob.errors import ConfigError, DataError, StorageError
from trainjob.store import digests, fetch, uri

log = logging.getLogger(__name__)

NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
# Keras' own published hash of that file (md5): WEIGHTS_HASHES["resnet50"][1] in
# keras/src/applications/resnet.py (a test checks the two agree).
NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
NOTOP_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/resnet/{NOTOP_FILE}"
FETCH_TIMEOUT = 10.0  # seconds per connect or read: no network fails in seconds

MODEL = "model"  # a full trainjob model: every layer, head included
BACKBONE = "backbone"  # Keras' no-top ResNet50: the backbone only, the head starts fresh

MIRROR_HINT = (f"mirror the file into a bucket (README, 'Pretrained weights without "
               f"internet') and pass --weights s3://BUCKET/{NOTOP_FILE}")


@dataclass(frozen=True)
class InitialWeights:
    kind: str  # MODEL or BACKBONE
    path: Path


def resolve(spec: str, cache_dir: Path, threads: int) -> InitialWeights | None:
    """The local file ``--weights`` names (fetched or downloaded), its kind, checked."""
    if spec == "none":
        return None
    if spec == "imagenet":
        path = imagenet_file()
    else:
        scheme, _, key = uri.parse_uri(spec)
        if scheme == "file" and not Path(key).expanduser().is_file():
            raise ConfigError(f"--weights {spec}: no such file: give a path or s3:// URI of "
                              "a weights file")
        path = fetch.fetch(spec, cache_dir, threads, single=True).path
    kind = kind_of(path, spec)
    if kind == BACKBONE and path.name == NOTOP_FILE:
        check_hash(path, spec)
    log.info("--weights %s: %s", spec, "a full trainjob model" if kind == MODEL else
             "a ResNet50 backbone (no top); the classifier head starts fresh")
    return InitialWeights(kind, path)


def kind_of(path: Path, spec: str) -> str:
    """MODEL or BACKBONE, from the file's contents; anything else is a usage error."""
    import h5py  # installed with Keras; imported late, as only --weights files need it

    try:
        with h5py.File(path, "r") as f:
            if "layers" in f and "vars" in f:
                return MODEL
            names = f.attrs.get("layer_names")
            names = {n.decode() if isinstance(n, bytes) else str(n)
                     for n in (names if names is not None else [])}
            if "conv1_conv" in names and "predictions" not in names:
                return BACKBONE
    except OSError as exc:
        raise ConfigError(f"--weights {spec}: not an HDF5 weights file ({exc}); give a "
                          f"trainjob .weights.h5 or Keras' {NOTOP_FILE}") from exc
    raise ConfigError(f"--weights {spec}: neither a trainjob model's .weights.h5 nor Keras' "
                      f"ResNet50 no-top file ({NOTOP_FILE}); give one of those")


def check_hash(path: Path, spec: str) -> None:
    """A file named like Keras' no-top file must be that file (exit 3 otherwise)."""
    actual = digests.md5(path)
    if actual != NOTOP_MD5:
        raise DataError(f"--weights {spec}: md5 {actual} does not match Keras' published "
                        f"{NOTOP_MD5} for {NOTOP_FILE}; mirror the file again from {NOTOP_URL}")


def keras_home() -> Path:
    """Where Keras keeps its downloads: KERAS_HOME, else ~/.keras (/tmp/.keras when the
    home folder is not writable), as keras.src.backend.config decides it."""
    if home := os.environ.get("KERAS_HOME"):
        return Path(home)
    base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
    return base / ".keras"


def imagenet_file() -> Path:
    """Keras' no-top file in Keras' own cache, downloaded from Keras' URL if not there.

    Fails in seconds with exit 4 and the mirroring hint when it cannot be fetched."""
    path = keras_home() / "models" / NOTOP_FILE
    if path.is_file() and digests.md5(path) == NOTOP_MD5:
        return path
    partial = path.with_name("partial." + path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading the ImageNet weights from %s to %s", NOTOP_URL, path)
        with urllib.request.urlopen(NOTOP_URL, timeout=FETCH_TIMEOUT) as response, \
                open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:  # URLError, timeouts, refused connections, a read-only cache
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise StorageError(f"--weights imagenet: cannot fetch {NOTOP_URL} into {path.parent} "
                           f"({reason}); {MIRROR_HINT}") from exc
    try:
        check_hash(partial, "imagenet")
    except DataError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path
