"""Image files of every format and mode the scan accepts, for the decode tests: what Pillow
writes, and by hand what it cannot (16-bit colour PNGs, 4-bit, 16-bit and 32-bit BMPs)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 12  # square, so that the pipeline's resize to SIDE is the identity


def picture() -> np.ndarray:
    """RGB with structure: a gradient in red, another in green, blue constant but for a corner
    mark; no two neighbouring pixels alike, so a wrong decode cannot hide."""
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[..., 0] = np.arange(SIDE) * 20
    image[..., 1] = (np.arange(SIDE) * 17)[:, None] + 30
    image[..., 2] = 200
    image[:3, :3, 2] = 20
    return image


def alpha() -> np.ndarray:
    return (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) * 255 // (SIDE * SIDE)).astype(np.uint8)


def _rgb() -> Image.Image:
    return Image.fromarray(picture())


def _paletted() -> Image.Image:
    return _rgb().quantize(colors=16)


def _pillow(mode: str | None, fmt: str, image: Callable[[], Image.Image] = _rgb,
            **options) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        img = image()
        (img.convert(mode) if mode else img).save(path, fmt, **options)
    return write


def _rgba() -> Image.Image:
    return Image.fromarray(np.dstack([picture(), alpha()]))


def _grey16() -> Image.Image:
    return Image.fromarray((picture()[..., 0].astype(np.uint16) * 257 + 99).astype(np.uint16))


def _animated_gif(path: Path) -> None:
    first, second = _paletted(), Image.fromarray(255 - picture()).quantize(colors=16)
    first.save(path, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def _png16(color_type: int, channels: Callable[[], np.ndarray]) -> Callable[[Path], None]:
    """A 16-bit-per-sample PNG, written by hand (Pillow writes 16 bits for grey only)."""
    def write(path: Path) -> None:
        data = channels().astype(">u2")
        rows = b"".join(b"\0" + row.tobytes() for row in data)

        def chunk(kind: bytes, body: bytes) -> bytes:
            return (struct.pack(">I", len(body)) + kind + body
                    + struct.pack(">I", zlib.crc32(kind + body)))
        header = struct.pack(">IIBBBBB", SIDE, SIDE, 16, color_type, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                         + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return write


def _bmp(bits: int, rows: Callable[[], list[bytes]], palette: list[tuple] = (),
         masks: tuple[int, ...] = ()) -> Callable[[Path], None]:
    """A BMP (BITMAPINFOHEADER) of ``bits`` per pixel, written by hand: Pillow writes only 1, 8
    and 24 bits. ``masks``: BI_BITFIELDS."""
    def write(path: Path) -> None:
        raw = rows()
        stride = (len(raw[0]) + 3) // 4 * 4
        pixels = b"".join(r.ljust(stride, b"\0") for r in reversed(raw))  # bottom-up
        table = b"".join(bytes([b, g, r, 0]) for r, g, b in palette)
        fields = b"".join(struct.pack("<I", m) for m in masks)
        offset = 14 + 40 + len(fields) + len(table)
        path.write_bytes(
            struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, SIDE, SIDE, 1, bits, 3 if masks else 0,
                          len(pixels), 2835, 2835, len(palette), 0)
            + fields + table + pixels)
    return write


def _nibbles() -> list[bytes]:
    index = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) * 7 % 16).astype(np.uint8)
    return [bytes((int(a) << 4) | int(b) for a, b in zip(row[::2], row[1::2])) for row in index]


def _rgb565() -> list[bytes]:
    return [b"".join(struct.pack("<H", (int(r) >> 3) << 11 | (int(g) >> 2) << 5 | int(b) >> 3)
                     for r, g, b in row) for row in picture()]


def _bgra() -> list[bytes]:
    rgba = np.dstack([picture(), alpha()])
    return [rgba[y][:, [2, 1, 0, 3]].tobytes() for y in range(SIDE)]


# name (format-mode-detail, the file's suffix last) -> writer
FILES: dict[str, Callable[[Path], None]] = {
    "jpeg-rgb.jpg": _pillow(None, "JPEG", quality=95),
    "jpeg-grey.jpg": _pillow("L", "JPEG", quality=95),
    "jpeg-cmyk.jpg": _pillow("CMYK", "JPEG", quality=95),
    "jpeg-progressive.jpg": _pillow(None, "JPEG", quality=95, progressive=True),
    "png-rgb.png": _pillow(None, "PNG"),
    "png-rgba.png": _pillow(None, "PNG", _rgba),
    "png-grey.png": _pillow("L", "PNG"),
    "png-grey-alpha.png": _pillow("LA", "PNG", _rgba),
    "png-paletted.png": _pillow(None, "PNG", _paletted),
    "png-paletted-transparent.png": _pillow(None, "PNG", _paletted, transparency=3),
    "png-bilevel.png": _pillow("1", "PNG"),
    "png-grey16.png": _pillow(None, "PNG", _grey16),
    "png-rgb48.png": _png16(2, lambda: picture().astype(np.uint16) * 257 + 77),
    "png-rgba64.png": _png16(6, lambda: np.dstack([picture(), alpha()]).astype(np.uint16) * 257),
    "png-grey-alpha32.png": _png16(4, lambda: np.dstack([picture()[..., 1], alpha()])
                                   .astype(np.uint16) * 257),
    "gif-paletted.gif": _pillow(None, "GIF", _paletted),
    "gif-paletted-transparent.gif": _pillow(None, "GIF", _paletted, transparency=3),
    "gif-grey.gif": _pillow("L", "GIF"),
    "gif-animated.gif": _animated_gif,
    "bmp-rgb.bmp": _pillow(None, "BMP"),
    "bmp-grey.bmp": _pillow("L", "BMP"),
    "bmp-paletted.bmp": _pillow(None, "BMP", _paletted),
    "bmp-bilevel.bmp": _pillow("1", "BMP"),
    "bmp-paletted4.bmp": _bmp(4, _nibbles, [(i * 16, 255 - i * 16, i * 40 % 256)
                                            for i in range(16)]),
    "bmp-rgb565.bmp": _bmp(16, _rgb565, masks=(0xF800, 0x07E0, 0x001F)),
    "bmp-bgra32.bmp": _bmp(32, _bgra),
    "tiff-rgb.tif": _pillow(None, "TIFF"),
    "tiff-cmyk.tif": _pillow("CMYK", "TIFF"),
    "tiff-grey.tif": _pillow("L", "TIFF"),
    "tiff-grey16.tif": _pillow(None, "TIFF", _grey16),
    "webp-rgb.webp": _pillow(None, "WEBP", lossless=True),
    "webp-rgba.webp": _pillow(None, "WEBP", _rgba, lossless=True),
    "ppm-rgb.ppm": _pillow(None, "PPM"),
    "pgm-grey.pgm": _pillow("L", "PPM"),
}


def pillow_rgb(path: Path) -> np.ndarray:
    """The colours Pillow shows: ``convert("RGB")``. For 16-bit grey, whose ``convert`` clips
    at 255 (a 16-bit picture would come out white), the high byte of each sample, which is
    how Pillow itself reduces 16-bit colour PNGs to RGB."""
    with Image.open(path) as img:
        if img.mode.startswith("I;16") or img.mode == "I":  # "I": 16-bit PNGs, older Pillow
            grey = (np.asarray(img).astype(np.int64) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))
