"""``dataset inspect``'s report: a ``Catalog`` from the training scan, as plain data.

Every count comes from the catalog that ``datasource.load_catalog`` builds for training, so
the report cannot disagree with what a run would train on.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from trainjob.data.catalog import BACKGROUND, Catalog, check_usable
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
