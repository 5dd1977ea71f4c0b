"""One shard built in a packing process: its images read (re-encoded where it pays), framed
as records into a local file, hashed; or, when the shard already stored was built from the
same inputs, nothing written at all.

These functions run in the processes of ``packing``'s pool (``spawn``: nothing of the
parent's threads or locks is inherited). Each process watches its parent: a pack killed
with SIGKILL leaves no process behind, busy or idle.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from trainjob.data import packfmt
from trainjob.data.packed import FORMAT, VERSION

# Re-encoding: only an image whose long side is at least REENCODE_RATIO x --max-side (a
# smaller gain is not worth a second lossy encoding), to JPEG at this quality, and only
# kept when smaller than the original.
REENCODE_RATIO = 1.25
JPEG_QUALITY = 95
PARENT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class PackItem:
    id: int
    label: int
    path: str  # the file training decodes: the original, or the scan's converted PNG
    key: str  # "class/file name" of the original


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    first: int  # position of its first sample in the split
    items: tuple[PackItem, ...]
    source_bytes: int  # of its input files: what progress counts


@dataclass(frozen=True)
class Built:
    """A shard's outcome in a packing process: reused (``path`` None) or written to
    ``path``; ``inputs`` is the digest of what it was built from."""

    name: str
    inputs: str
    sha256: str
    bytes: int
    reencoded: int
    path: str | None


def watch_parent(parent: int) -> None:
    """Pool initializer: end this process as soon as its parent is gone (a SIGKILLed pack
    runs no clean-up, and an idle pool process would wait on its queue for ever)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def encoded(path: str, max_side: int) -> tuple[bytes, bool]:
    """(the bytes to store, whether they are re-encoded): the file as it is, unless its long
    side is at least REENCODE_RATIO x ``max_side`` (0: never): then, scaled to ``max_side``
    (Lanczos; a JPEG decoded at a reduced scale first where libjpeg can), JPEG at
    JPEG_QUALITY, if that is smaller than the file."""
    data = Path(path).read_bytes()
    if not max_side:
        return data, False
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) < REENCODE_RATIO * max_side:
            return data, False
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.draft("RGB", size)  # a JPEG decodes at 1/2, 1/4, 1/8 where still >= size
        rgb = img.convert("RGB")
    out = io.BytesIO()
    rgb.resize(size, Image.LANCZOS).save(out, "JPEG", quality=JPEG_QUALITY)
    small = out.getvalue()
    return (small, True) if len(small) < len(data) else (data, False)


def inputs_digest(plan: ShardPlan, max_side: int) -> str:
    """What a shard's bytes follow from: the format, the re-encoding rule, and each sample's
    id, label, split, key and file contents (not paths or times: a fresh extraction of the
    same data on another machine gives the same digest)."""
    h = hashlib.sha256(f"{FORMAT}:{VERSION}:{max_side}:{REENCODE_RATIO}:{JPEG_QUALITY}:"
                       f"{plan.name}:{plan.split}:{plan.first}".encode())
    for item in plan.items:
        with open(item.path, "rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        h.update(f"\n{item.id}\t{item.label}\t{item.key}\t{content}".encode())
    return h.hexdigest()


def build_shard(plan: ShardPlan, max_side: int, stored: dict | None, stored_copy: str | None,
                tmp_dir: str) -> Built:
    """Build ``plan`` into a file under ``tmp_dir``, unless ``stored`` (the record of the
    shard in the store, its size and ETag already checked) says it was built from the same
    inputs; ``stored_copy``, the stored file itself where the store is a local folder, must
    then also still have its recorded sha256."""
    inputs = inputs_digest(plan, max_side)
    if stored and stored.get("inputs") == inputs and (
            stored_copy is None or _sha256(stored_copy) == stored.get("sha256")):
        return Built(plan.name, inputs, stored["sha256"], stored["bytes"],
                     stored.get("reencoded", 0), None)
    tmp = Path(tmp_dir) / f"{plan.name}.{os.getpid()}.tmp"
    h, size, reencoded = hashlib.sha256(), 0, 0
    with open(tmp, "wb") as f:
        for item in plan.items:
            image, again = encoded(item.path, max_side)
            reencoded += again
            record = packfmt.sample_record(item.id, item.label, plan.split, image, item.key)
            f.write(record)
            h.update(record)
            size += len(record)
    return Built(plan.name, inputs, h.hexdigest(), size, reencoded, str(tmp))


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None
