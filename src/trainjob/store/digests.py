"""File digests: sha256 for manifests and resume pairs, md5 where a publisher states one
(Keras' weight files, the Caltech101 archive)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    return file_digest(path, "sha256")


def md5(path: Path) -> str:
    """Hex md5 of the file at ``path`` (to compare with a published checksum only)."""
    return file_digest(path, "md5")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks rather than whole."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
