"""Generate small Caltech101-like datasets for the demo, the tests and the benchmarks.

Each class gets its own colour and stripe pattern plus noise, so a model can learn it in a
few epochs at 32-64 px. ``add_bad_files`` adds the oddities real Caltech101 has.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = "BACKGROUND_Google"


def class_names(n: int) -> list[str]:
    base = ["accordion", "airplanes", "anchor", "ant", "barrel", "bass", "beaver", "binocular",
            "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon"]
    return [base[i] if i < len(base) else f"class_{i:03d}" for i in range(n)]


def image_for(label: int, index: int, size: tuple[int, int] = (48, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed * 1_000_003 + label * 10_007 + index)
    h, w = size
    hue = np.array([(label * 67) % 256, (label * 151 + 80) % 256, (label * 29 + 160) % 256])
    img = np.ones((h, w, 3)) * hue
    period = 4 + (label % 5) * 3
    stripes = ((np.arange(w) // period) % 2)[None, :, None] * 60.0
    img = img + stripes + rng.normal(0, 18, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_class_folders(root: Path, classes: int = 10, per_class: int = 20,
                       size: tuple[int, int] = (48, 64), background: bool = True,
                       seed: int = 0) -> list[str]:
    names = class_names(classes)
    for label, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image_for(label, i, size, seed).save(d / f"image_{i + 1:04d}.jpg", quality=90)
    if background:
        d = root / BACKGROUND
        d.mkdir(parents=True, exist_ok=True)
        for i in range(max(3, per_class // 4)):
            image_for(99, i, size, seed).save(d / f"image_{i + 1:04d}.jpg")
    return names


def add_bad_files(root: Path, names: list[str]) -> dict[str, str]:
    """Grayscale, CMYK and PNG-as-.jpg (all usable) plus truncated, empty, non-image (skipped)."""
    a, b, c = (root / n for n in names[:3])
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(a / "gray_0001.jpg")
    image_for(1, 900).convert("CMYK").save(b / "cmyk_0001.jpg")
    image_for(2, 901).save(c / "png_as_jpg_0001.jpg", format="PNG")
    buf = io.BytesIO()
    image_for(0, 902).save(buf, "JPEG")
    (a / "truncated_0001.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (b / "empty_0001.jpg").write_bytes(b"")
    (c / "notes.txt").write_text("not an image\n")
    return {"usable": ["gray_0001.jpg", "cmyk_0001.jpg", "png_as_jpg_0001.jpg"],
            "skipped": ["truncated_0001.jpg", "empty_0001.jpg", "notes.txt"]}


def make_official_zip(zip_path: Path, class_root: Path) -> Path:
    """Lay out a zip like the official caltech-101.zip around a folder of class folders."""
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        tar.add(class_root, arcname="101_ObjectCategories")
    ann = io.BytesIO()
    with tarfile.open(fileobj=ann, mode="w") as tar:
        data = b"MATLAB 5.0 MAT-file (fake annotation)"
        info = tarfile.TarInfo("Annotations/accordion/annotation_0001.mat")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("caltech-101/", "")
        zf.writestr("caltech-101/101_ObjectCategories.tar.gz", tgz.getvalue())
        zf.writestr("caltech-101/Annotations.tar", ann.getvalue())
        zf.writestr("caltech-101/show_annotation.m", "% show_annotation(imgpath, annotation)\n")
        zf.writestr("__MACOSX/caltech-101/._101_ObjectCategories.tar.gz", b"\x00\x05\x16\x07junk")
        zf.writestr("__MACOSX/caltech-101/._Annotations.tar", b"\x00\x05\x16\x07junk")
    return zip_path


def make_solid_classes(root: Path, per_class: int = 24) -> None:
    """Three solid-colour classes: trivially learnable (the learnability test)."""
    colours = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 40, 220)}
    rng = np.random.default_rng(7)
    for name, rgb in colours.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb) + rng.normal(0, 10, (40, 40, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(d / f"{name}_{i:03d}.jpg")


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like RGB picture: a smooth gradient, a few soft blobs, band-limited texture
    and a little noise, on which JPEG spends bytes as it does on real photos (q90: ~34 KB at
    300 x 220, Caltech101's typical size and file size)."""
    from PIL import ImageFilter

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    t = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / (h + w) + 0.5
    img += c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(rng.integers(3, 8)):  # soft objects
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, 80)
        blob = np.exp(-(((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r)))
        img += blob[..., None] * rng.uniform(-90, 90, 3)
    noise = np.clip(rng.normal(0, 1, (h, w, 3)).astype(np.float32) * 40 + 128, 0, 255)
    texture = np.asarray(Image.fromarray(noise.astype(np.uint8))
                         .filter(ImageFilter.GaussianBlur(0.9)), np.float32) - 128
    img += texture * rng.uniform(1.4, 2.4)
    img += rng.normal(0, 3, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_photo_folders(root: Path, classes: int = 30, per_class: int = 100,
                       seed: int = 0) -> list[Path]:
    """Caltech-sized JPEGs in class folders: 300 px wide and 180-260 px high (one in five
    turned upright), quality 90; deterministic in (seed, class, index)."""
    out = []
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(seed * 1_000_003 + c * 10_007 + i)
            h, w = int(rng.integers(180, 260)), 300
            if rng.random() < 0.2:
                h, w = w, h
            path = folder / f"image_{i:04d}.jpg"
            Image.fromarray(photo(rng, h, w)).save(path, quality=90)
            out.append(path)
    return out
