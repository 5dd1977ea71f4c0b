"""Datasets on disk: class-folder discovery, image checks, splits; archives are unpacked by
``archives`` (``unpack`` is re-exported here).

Works on the official ``caltech-101.zip`` as distributed (a zip holding
``101_ObjectCategories.tar.gz`` beside ``Annotations.tar`` and ``__MACOSX`` junk), on
plain folders of class folders, and on anything in between.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trainjob.data.archives import ARCHIVE_SUFFIXES, is_archive, is_junk, unpack, walk_files
from trainjob.data.images import GRAYSCALE_MODES, IMAGE_SUFFIXES, check_image, prune_converted
from trainjob.data.stream import Packed
from trainjob.errors import ConfigError, DataError
from trainjob.store import hostcache

log = logging.getLogger(__name__)


__all__ = ["ARCHIVE_SUFFIXES", "Catalog", "Sample", "Splits", "check_files", "check_image",
           "check_usable", "is_archive", "locate", "scan", "split", "unpack"]


BACKGROUND = "BACKGROUND_Google"


@dataclass(frozen=True)
class Sample:
    path: str  # the file training decodes: the original, or its converted PNG
    label: int
    origin: str = field(default="", compare=False)  # the original file, where it differs


@dataclass
class Catalog:
    """The usable images of a dataset, and what was skipped."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: int = 0
    modes: dict[str, int] = field(default_factory=dict)  # PIL modes of the usable originals
    size_range: dict[str, int] = field(default_factory=dict)  # min/max width and height

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {name: c[i] for i, name in enumerate(self.classes)}

    def image_stats(self) -> dict:
        """Sizes and colour modes of the usable images, as they were before conversion."""
        return {"size_range": self.size_range, "modes": self.modes,
                "grayscale": sum(n for m, n in self.modes.items() if m in GRAYSCALE_MODES),
                "cmyk": self.modes.get("CMYK", 0)}

    def summary(self) -> dict:
        return {"root": str(self.root), "classes": len(self.classes), "images": len(self.samples),
                "class_counts": self.counts(), "converted_to_rgb": self.converted,
                "skipped": len(self.skipped), "skipped_files": self.skipped,
                "image_stats": self.image_stats()}


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def samples_digest(classes: list[str], splits: Splits) -> str:
    """What a run's fingerprint says of its images: class name + file name of every image,
    then of the training images; the same wherever the data was extracted, and the same
    for the dataset packed (``data.packing`` records it in the index)."""
    def digest(samples: list[Sample]) -> str:
        names = sorted(f"{classes[s.label]}/{Path(s.path).name}" for s in samples)
        return hashlib.sha1("\n".join(names).encode()).hexdigest()

    return digest(splits.train + splits.val + splits.test) + ":" + digest(splits.train)


@dataclass
class Dataset:
    """A dataset ready to train on, and what config.json says about it. Files: its checked
    catalog and the split. Packed (``packed`` set): the index's classes; the split and
    the images are in the shards, streamed (``data.stream``), and ``splits`` is empty."""

    catalog: Catalog
    splits: Splits
    summary: dict
    packed: Packed | None = None

    @property
    def classes(self) -> list[str]:
        return self.catalog.classes

    def sizes(self) -> dict[str, int]:
        return dict(self.packed.index.counts) if self.packed else self.splits.sizes()

    def train_class_counts(self) -> list[int]:
        """Training images per class, in class order (``--class-weight balanced``)."""
        if self.packed:
            return list(self.packed.index.class_counts["train"])
        counts = Counter(s.label for s in self.splits.train)
        return [counts[i] for i in range(len(self.classes))]

    def samples_digest(self) -> str:
        return self.packed.index.samples if self.packed else \
            samples_digest(self.classes, self.splits)

    def fixed_split(self) -> dict:
        """The split settings a packed dataset was split with (they, not the job's, are
        what its split means); {} for files, which the job's settings split."""
        if not self.packed:
            return {}
        split = self.packed.index.split
        return {"val_fraction": split.val_fraction, "test_fraction": split.test_fraction,
                "train_per_class": split.train_per_class}


def check_test_split(data: Dataset, where: str, test_fraction: float) -> None:
    """The final model is scored on the test split: an empty one fails now, in a second,
    rather than after the whole training."""
    if data.sizes()["test"]:
        return
    if data.packed is None and test_fraction == 0:
        raise ConfigError(f"--test-fraction 0 leaves no test images in {where}: the final "
                          "model is scored on the test split; give a fraction above 0")
    raise DataError(f"the test split of {where} is empty (every class has fewer than 3 "
                    "images, or it was packed so): the final model is scored on it; add "
                    "images, or split (pack) it with a larger --test-fraction")


def locate(roots: list[Path]) -> Path:
    """The folder whose subfolders hold the most images: the class root."""
    best, best_score = None, (0, 0)
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not is_junk(d) and not d.startswith(".")]
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
    """Check every file under the class folders; keep the decodable images; fail (DataError)
    when the result is not fit for training (``check_usable``).

    Other jobs on this host share ``converted_dir``: it is held shared while the scan runs
    (within a ``hostcache.session()``, for the whole run), and pruned only when no one else holds it.
    """
    catalog = check_files(root, converted_dir, include_background=include_background,
                          threads=threads)
    check_usable(catalog, max_bad_fraction)
    return catalog


def check_files(root: Path, converted_dir: Path, *, include_background: bool = False,
                threads: int = 8) -> Catalog:
    """``scan`` without the verdict: every file checked, whatever the share of bad ones."""
    classes = sorted(d.name for d in root.iterdir()
                     if d.is_dir() and not is_junk(d.name) and not d.name.startswith("."))
    if not include_background:
        classes = [c for c in classes if c != BACKGROUND]
    files = [(label, p) for label, c in enumerate(classes) for p in walk_files(root / c)]
    converted_dir.mkdir(parents=True, exist_ok=True)
    with hostcache.using(converted_dir, tidy=lambda: prune_converted(converted_dir)):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            checked = list(pool.map(lambda lp: check_image(lp[1], converted_dir), files))
    samples, skipped, converted = [], [], 0
    modes: Counter[str] = Counter()
    for (label, path), check in zip(files, checked):
        if check.usable is None:
            skipped.append({"path": str(path.relative_to(root)), "reason": check.reason})
        else:
            samples.append(Sample(str(check.usable), label,
                                  str(path) if check.usable != path else ""))
            converted += check.usable != path
            modes[check.mode] += 1
    usable = [c for c in checked if c.usable is not None]
    size_range = {"min_width": min(c.width for c in usable),
                  "max_width": max(c.width for c in usable),
                  "min_height": min(c.height for c in usable),
                  "max_height": max(c.height for c in usable)} if usable else {}
    return Catalog(root, classes, samples, skipped, converted, dict(sorted(modes.items())),
                   size_range)


def check_usable(catalog: Catalog, max_bad_fraction: float) -> None:
    """DataError when training could not use ``catalog``: no images, too many bad files,
    fewer than two classes with images."""
    bad = len(catalog.skipped)
    total = len(catalog.samples) + bad
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


def split(catalog: Catalog, *, val_fraction: float, test_fraction: float,
          train_per_class: int | None, seed: int) -> Splits:
    """Deterministic, stratified split: the same seed always gives the same three lists.

    Validation and test are listed class by class; training comes in a seeded random order.
    """
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
    # Listed class by class, the training images would reach tf.data's shuffle buffer (at
    # most 10,000) in class order: mix them here, by seed, so resumed runs see the same order.
    random.Random(f"{seed}:train-order").shuffle(out.train)
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
