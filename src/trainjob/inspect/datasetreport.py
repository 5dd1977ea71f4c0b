"""``dataset inspect``'s report: a ``Catalog`` from the training scan, or a packed
dataset's index, as plain data.

Every count comes from the catalog that ``datasource.load_catalog`` builds for training, so
the report cannot disagree with what a run would train on; a packed dataset's come from its
index, which the same scan wrote (nothing is scanned again).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from trainjob.data.catalog import BACKGROUND, Catalog, check_usable
from trainjob.data.packed import FORMAT, SPLITS, VERSION, PackedIndex
from trainjob.errors import DataError

log = logging.getLogger(__name__)


def build_report(uri: str, catalog: Catalog, max_bad_fraction: float) -> dict[str, Any]:
    """Classes with their image and skipped counts, image sizes and modes, the skipped files
    with reasons, and whether training would accept the data (``verdict``: None if so)."""
    counts = catalog.counts()
    skipped_by_class = Counter(Path(s["path"]).parts[0] for s in catalog.skipped)
    try:
        check_usable(catalog, max_bad_fraction)
        verdict = None
    except DataError as exc:
        verdict = str(exc)
    files = len(catalog.samples) + len(catalog.skipped)
    background = (catalog.root / BACKGROUND).is_dir() and BACKGROUND not in catalog.classes
    return {
        "uri": uri,
        "class_root": str(catalog.root),
        "classes": [{"name": name, "images": counts[name], "skipped": skipped_by_class[name]}
                    for name in catalog.classes],
        "totals": {"classes": len(catalog.classes), "files": files,
                   "images": len(catalog.samples), "skipped": len(catalog.skipped),
                   "converted_to_rgb": catalog.converted},
        "image_stats": catalog.image_stats(),
        "skipped_files": catalog.skipped,
        "background_left_out": background,
        "max_bad_fraction": max_bad_fraction,
        "verdict": verdict,
    }


def packed_report(uri: str, index: PackedIndex) -> dict[str, Any]:
    """A packed dataset as its index describes it: classes, images and shards per split,
    the split's settings, image sizes and modes, and the files the pack skipped."""
    splits = {}
    for split in SPLITS:
        shards = index.split_shards(split)
        counts = [s.count for s in shards]
        splits[split] = {"images": index.counts[split], "shards": len(shards),
                         "bytes": sum(s.bytes for s in shards),
                         "min_per_shard": min(counts, default=0),
                         "max_per_shard": max(counts, default=0)}
    return {
        "uri": uri, "packed": {"format": FORMAT, "version": VERSION,
                               "created": index.created, "source": index.source,
                               "max_side": index.max_side, "samples": index.samples},
        "classes": index.classes, "split": dataclasses.asdict(index.split), "splits": splits,
        "totals": {"classes": len(index.classes), "images": sum(index.counts.values()),
                   "shards": len(index.shards), "bytes": sum(s.bytes for s in index.shards),
                   "skipped": len(index.skipped)},
        "image_stats": index.image_stats, "skipped_files": index.skipped,
        "shards": [dataclasses.asdict(s) for s in index.shards],
    }
