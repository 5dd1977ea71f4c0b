"""One image file checked: readable, which format and mode, and the RGB file TensorFlow
decodes to the colours Pillow shows (converted once where TensorFlow would not)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm"}


# Formats and modes the pipeline (inputs.decode_image) reads to the colours Pillow shows;
# anything else is converted once. Not BMP: TensorFlow returns a paletted BMP's palette
# indices as grey and cannot read 4- or 16-bit ones. Not GIF: it blacks out the transparent
# colour. (tests/test_inputs.py checks every format and mode against Pillow.)
TF_NATIVE = {"JPEG": {"RGB", "L"}, "PNG": {"RGB", "RGBA", "L", "LA", "P", "I;16", "I"}}


# A converted image no scan has used for this long goes, when no job on the host uses the folder.
CONVERTED_MAX_AGE = 14 * 86_400


GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class Checked(NamedTuple):
    """One file's check: the path TensorFlow decodes (None: skipped, and why), and what the
    original is (PIL mode, width, height; empty for files that are no image)."""

    usable: Path | None
    reason: str
    mode: str = ""
    width: int = 0
    height: int = 0


def prune_converted(converted_dir: Path) -> None:
    """Drop converted images no scan has used for CONVERTED_MAX_AGE (scans touch the ones they
    use), and temporaries a killed writer left. Runs only while no other job holds the folder."""
    cutoff = time.time() - CONVERTED_MAX_AGE
    old = [p for p in converted_dir.iterdir() if p.suffix == ".png" and p.stat().st_mtime < cutoff]
    for path in old:
        path.unlink(missing_ok=True)
    if old:
        log.info("removed %d converted images unused for %d days from %s", len(old),
                 CONVERTED_MAX_AGE // 86_400, converted_dir)


def check_image(path: Path, converted_dir: Path) -> Checked:
    """(path TensorFlow can decode, '', what it is) or (None, why the file is unusable)."""
    try:
        if path.stat().st_size == 0:
            return Checked(None, "empty file")
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            img.load()  # decodes fully: catches truncated files
            what = (mode, img.width, img.height)
            if mode in TF_NATIVE.get(fmt, ()):
                return Checked(path, "", *what)
            # CMYK JPEGs, TIFF, WebP...: convert once to an RGB PNG TensorFlow reads.
            # Named by content: the same wherever the data was extracted, new when it changes.
            digest = hashlib.sha1(path.read_bytes()).hexdigest()[:20]
            out = converted_dir / f"{digest}.png"
            if out.exists():
                with contextlib.suppress(OSError):  # another user's file: it still serves
                    os.utime(out)  # in use: housekeeping spares what scans touched lately
            else:
                # Identical files (duplicates across classes) convert in parallel: each
                # writer has its own temporary name, and the atomic rename lets both win.
                tmp = out.with_name(f".{out.stem}-{threading.get_ident()}.png")
                to_rgb(img).save(tmp)
                os.replace(tmp, out)
            return Checked(out, "", *what)
    except UnidentifiedImageError:
        return Checked(None, "not an image")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return Checked(None, f"unreadable image: {exc}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Pillow's RGB of ``img``; 16-bit grey by the high byte of each sample, as Pillow reduces
    16-bit colour and TensorFlow 16-bit PNGs: its ``convert`` clips at 255 (white)."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
                               ).convert("RGB")
    return img.convert("RGB")
