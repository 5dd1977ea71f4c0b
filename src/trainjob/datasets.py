"""Datasets on disk: safe archive extraction, class-folder discovery, image checks, splits.

Works on the official ``caltech-101.zip`` as distributed (a zip holding
``101_ObjectCategories.tar.gz`` beside ``Annotations.tar`` and ``__MACOSX`` junk), on
plain folders of class folders, and on anything in between.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import stat
import tarfile
import threading
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from trainjob.errors import DataError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm"}
BACKGROUND = "BACKGROUND_Google"
# Formats and modes tf.io.decode_image reads as RGB directly; anything else is converted once.
TF_NATIVE = {"JPEG": {"RGB", "L"}, "PNG": {"RGB", "RGBA", "L", "LA", "P", "I;16", "I"},
             "GIF": {"P", "L", "RGB"}, "BMP": {"RGB", "L", "P"}}
MAX_NESTING = 3
# tarfile's extraction filters (PEP 706) exist from Python 3.11.4 on; older 3.11 patch
# releases (Debian bookworm's 3.11.2) rely on the member checks below alone.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass
class Catalog:
    """The usable images of a dataset, and what was skipped."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: int = 0

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {name: c[i] for i, name in enumerate(self.classes)}

    def summary(self) -> dict:
        return {"root": str(self.root), "classes": len(self.classes), "images": len(self.samples),
                "class_counts": self.counts(), "converted_to_rgb": self.converted,
                "skipped": len(self.skipped), "skipped_files": self.skipped}


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# --- archives ---------------------------------------------------------------------------

def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or p.startswith("._") or p == ".DS_Store" for p in parts)


class _Budget:
    """Total bytes all (nested) extractions may write: guards against archive bombs."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def spend(self, n: int, archive: Path) -> None:
        self.used += n
        if self.used > self.limit:
            raise DataError(f"{archive.name} unpacks to more than --max-extract-bytes "
                            f"({self.limit} bytes); raise the limit if the data is genuine")


def _safe_target(dest: Path, name: str, archive: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (name[1:2] == ":"):
        raise DataError(f"unsafe archive {archive.name}: member {name!r} points outside the "
                        "extraction folder; refusing to extract it")
    target = (dest / pure).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DataError(f"unsafe archive {archive.name}: member {name!r} escapes the "
                        "extraction folder; refusing to extract it")
    return target


def _check_link(dest: Path, name: str, link: str, archive: Path) -> None:
    base = PurePosixPath(name).parent
    if PurePosixPath(link).is_absolute() or \
            not (dest / base / link).resolve().is_relative_to(dest.resolve()):
        raise DataError(f"unsafe archive {archive.name}: link {name!r} -> {link!r} points "
                        "outside the extraction folder; refusing to extract it")


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                _safe_target(dest, m.name, archive)
                if m.isdev() or m.isfifo():
                    raise DataError(f"unsafe archive {archive.name}: {m.name!r} is a device "
                                    "or fifo; refusing to extract it")
                if m.issym():
                    _check_link(dest, m.name, m.linkname, archive)
                elif m.islnk():
                    _safe_target(dest, m.linkname, archive)
                budget.spend(m.size, archive)
                if not _is_junk(m.name):
                    members.append(m)
            # The 'data' filter re-checks all of the above inside tarfile itself.
            tar.extractall(dest, members=members, **_TAR_FILTER)
    except _TAR_FILTER_ERROR as exc:
        raise DataError(f"unsafe archive {archive.name}: {exc}; refusing to extract it") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot read archive {archive.name}: {exc}; re-upload it") from exc


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _safe_target(dest, info.filename, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    _check_link(dest, info.filename, zf.read(info).decode(errors="replace"),
                                archive)
                    continue  # never materialise links from zips
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                    raise DataError(f"unsafe archive {archive.name}: {info.filename!r} is a "
                                    "device or fifo; refusing to extract it")
                budget.spend(info.file_size, archive)
                if info.is_dir() or _is_junk(info.filename):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                # zipfile stops at the declared size, so the budget check above holds.
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"cannot read archive {archive.name}: {exc}; re-upload it") from exc


def _archive_key(archive: Path) -> str:
    st = archive.stat()
    return hashlib.sha1(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def extract(archive: Path, extract_root: Path, budget: _Budget) -> Path:
    """Unpack ``archive`` under ``extract_root`` once; a complete earlier unpack is reused."""
    dest = extract_root / f"{_archive_key(archive)}-{archive.name}"
    marker = dest / ".trainjob-complete"
    if marker.exists():
        budget.spend(int(marker.read_text() or 0), archive)
        return dest
    if dest.exists():
        _rmtree(dest)  # a crash mid-extract leaves a partial folder: start over
    dest.mkdir(parents=True)
    before = budget.used
    log.info("extracting %s", archive.name)
    if archive.name.lower().endswith(".zip"):
        _extract_zip(archive, dest, budget)
    else:
        _extract_tar(archive, dest, budget)
    marker.write_text(str(budget.used - before))
    return dest


def unpack(source: Path, extract_root: Path, max_bytes: int) -> list[Path]:
    """Folders holding the source's files with every archive in it unpacked (nested too)."""
    budget = _Budget(max_bytes)
    roots, frontier = [], [source]
    for _depth in range(MAX_NESTING + 1):
        found = []
        for item in frontier:
            if item.is_file():
                if not is_archive(item):
                    raise DataError(f"{item.name} is neither an archive (.zip, .tar, .tar.gz, "
                                    ".tgz) nor a folder; point --data at the dataset")
                item = extract(item, extract_root, budget)
            roots.append(item)
            found += [p for p in _walk_files(item) if is_archive(p)]
        frontier = found
        if not frontier:
            return roots
    raise DataError(f"{source.name}: archives nested more than {MAX_NESTING} deep")


def _walk_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d) and not d.startswith("."))
        for name in sorted(filenames):
            if not _is_junk(name) and not name.startswith("."):
                yield Path(dirpath) / name


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- class folders ----------------------------------------------------------------------

def locate(roots: list[Path]) -> Path:
    """The folder whose subfolders hold the most images: the class root."""
    best, best_score = None, (0, 0)
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not _is_junk(d) and not d.startswith(".")]
            if not dirnames:
                continue
            images, classes = 0, 0
            for d in dirnames:
                try:
                    n = sum(1 for f in os.scandir(Path(dirpath) / d)
                            if f.is_file() and Path(f.name).suffix.lower() in IMAGE_SUFFIXES)
                except OSError:
                    n = 0
                images += n
                classes += n > 0
            depth = -len(Path(dirpath).parts)
            if classes and (images, depth) > best_score:
                best, best_score = Path(dirpath), (images, depth)
    if best is None:
        raise DataError("no class folders with images found in the data: expected "
                        "<root>/<class>/<image>.jpg (e.g. 101_ObjectCategories/accordion/...)")
    log.info("class root: %s", best)
    return best


def scan(root: Path, converted_dir: Path, *, include_background: bool = False,
         max_bad_fraction: float = 0.05, threads: int = 8) -> Catalog:
    """Check every file under the class folders; keep the decodable images."""
    classes = sorted(d.name for d in root.iterdir()
                     if d.is_dir() and not _is_junk(d.name) and not d.name.startswith("."))
    if not include_background:
        classes = [c for c in classes if c != BACKGROUND]
    files = [(label, p) for label, c in enumerate(classes) for p in _walk_files(root / c)]
    converted_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        checked = list(pool.map(lambda lp: _check_image(lp[1], converted_dir), files))
    samples, skipped, converted = [], [], 0
    for (label, path), (usable, reason) in zip(files, checked):
        if usable is None:
            skipped.append({"path": str(path.relative_to(root)), "reason": reason})
        else:
            samples.append(Sample(str(usable), label))
            converted += usable != path
    catalog = Catalog(root, classes, samples, skipped, converted)
    _check_usable(catalog, len(files), max_bad_fraction)
    return catalog


def _check_image(path: Path, converted_dir: Path) -> tuple[Path | None, str]:
    """(path TensorFlow can decode, '') or (None, why the file is unusable)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            img.load()  # decodes fully: catches truncated files
            if mode in TF_NATIVE.get(fmt, ()):
                return path, ""
            # CMYK JPEGs, TIFF, WebP...: convert once to an RGB PNG TensorFlow reads.
            # Named by content: the same wherever the data was extracted, new when it changes.
            digest = hashlib.sha1(path.read_bytes()).hexdigest()[:20]
            out = converted_dir / f"{digest}.png"
            if not out.exists():
                # Identical files (duplicates across classes) convert in parallel: each
                # writer has its own temporary name, and the atomic rename lets both win.
                tmp = out.with_name(f".{out.stem}-{threading.get_ident()}.png")
                img.convert("RGB").save(tmp)
                os.replace(tmp, out)
            return out, ""
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, f"unreadable image: {exc}"


def _check_usable(catalog: Catalog, total: int, max_bad_fraction: float) -> None:
    bad = len(catalog.skipped)
    if bad:
        log.warning("skipped %d of %d files (first: %s: %s)", bad, total,
                    catalog.skipped[0]["path"], catalog.skipped[0]["reason"])
    if not catalog.samples:
        raise DataError(f"no readable images under {catalog.root} ({total} files, all "
                        "unreadable or not images); check the upload")
    if total and bad / total > max_bad_fraction:
        raise DataError(f"{bad} of {total} files under {catalog.root} are unreadable "
                        f"({bad / total:.1%} > --max-bad-fraction {max_bad_fraction:g}); "
                        "fix the data or raise the limit")
    empty = [c for c, n in catalog.counts().items() if n == 0]
    if empty:
        log.warning("classes with no usable image: %s", ", ".join(empty))
    if len(catalog.classes) - len(empty) < 2:
        raise DataError(f"only {len(catalog.classes) - len(empty)} class with images under "
                        f"{catalog.root}: classification needs at least 2")


# --- splits -----------------------------------------------------------------------------

def split(catalog: Catalog, *, val_fraction: float, test_fraction: float,
          train_per_class: int | None, seed: int) -> Splits:
    """Deterministic, stratified split: the same seed always gives the same three lists."""
    by_class: dict[int, list[Sample]] = {}
    for s in catalog.samples:
        by_class.setdefault(s.label, []).append(s)
    out = Splits([], [], [])
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: s.path)
        random.Random(f"{seed}:{catalog.classes[label]}").shuffle(items)
        n_train, n_val = _split_sizes(len(items), val_fraction, test_fraction, train_per_class)
        out.train += items[:n_train]
        out.val += items[n_train:n_train + n_val]
        out.test += items[n_train + n_val:]
    return out


def _split_sizes(n: int, val_fraction: float, test_fraction: float,
                 train_per_class: int | None) -> tuple[int, int]:
    """(train, val) counts for a class of n; the rest is test. Train always gets one."""
    if train_per_class is not None:
        # Exactly N where the class has more; tiny classes keep one image each for val/test.
        n_train = train_per_class if n > train_per_class else max(1, n - 2)
        rest = n - n_train
        return n_train, rest // 2  # an odd image goes to test: every class gets scored
    n_val = round(n * val_fraction)
    n_test = round(n * test_fraction)
    if n >= 3:  # small classes still get one of each where asked for
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    while n_val + n_test > n - 1:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val
