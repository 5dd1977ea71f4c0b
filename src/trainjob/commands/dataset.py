"""``trainjob dataset``: look at a dataset the way training sees it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from trainjob import datasetreport, datasource, textfmt
from trainjob.commands import options
from trainjob.config import DataConfig
from trainjob.datasets import BACKGROUND
from trainjob.errors import DataError

log = logging.getLogger(__name__)


@click.group(name="dataset")
def dataset() -> None:
    """Inspect datasets (never imports TensorFlow)."""
    options.logs_to_stderr()


@dataset.command(name="inspect")
@click.argument("uri")
@options.json_output
@options.from_config("include_background")
@options.from_config("max_bad_fraction")
@options.from_config("max_extract_bytes")
@options.from_config("cache_dir")
@options.threads
def inspect_dataset(uri: str, as_json: bool, include_background: bool, max_bad_fraction: float,
                    max_extract_bytes: int, cache_dir: str, threads: int) -> None:
    """Classes, image counts, sizes and modes, and unreadable files of the dataset URI
    (anything --data takes), from the same download, extraction and image checks as
    training. Exit 3 when training would refuse the data."""
    # The same checks train's options get (URI scheme, ranges), with the same messages.
    DataConfig(data=uri, include_background=include_background, cache_dir=cache_dir,
               max_extract_bytes=max_extract_bytes, max_bad_fraction=max_bad_fraction)
    catalog, _ = datasource.load_catalog(
        uri, Path(cache_dir), include_background=include_background,
        max_extract_bytes=max_extract_bytes, max_bad_fraction=None, threads=threads,
        scan_threads=datasource.scan_threads())
    report = datasetreport.build_report(uri, catalog, max_bad_fraction)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_report(report))
    if report["verdict"]:
        raise DataError(f"training would refuse {uri}: {report['verdict']}")


def render_report(r: dict) -> str:
    """The text of ``dataset inspect``."""
    t = r["totals"]
    rows = [[c["name"], c["images"], c["skipped"]] for c in r["classes"]]
    rows.append(["TOTAL", t["images"], t["skipped"]])
    parts = [f"{r['uri']}: {t['classes']} classes, {t['images']} usable images, "
             f"{t['skipped']} skipped, of {t['files']} files (class root {r['class_root']})",
             textfmt.table(["CLASS", "IMAGES", "SKIPPED"], rows, right=(1, 2))]
    stats = r["image_stats"]
    sizes = stats["size_range"]
    if sizes:
        parts.append(f"image sizes: width {sizes['min_width']}-{sizes['max_width']} px, "
                     f"height {sizes['min_height']}-{sizes['max_height']} px\n"
                     f"grayscale: {stats['grayscale']}, CMYK: {stats['cmyk']}, "
                     f"converted to RGB for training: {t['converted_to_rgb']}\n"
                     "modes: " + ", ".join(f"{m} {n}" for m, n in stats["modes"].items()))
    if r["skipped_files"]:
        parts.append(f"unreadable or not images ({len(r['skipped_files'])}, skipped by "
                     "training)\n" + textfmt.table(
                         ["FILE", "REASON"],
                         [[s["path"], s["reason"]] for s in r["skipped_files"]]))
    if r["background_left_out"]:
        parts.append(f"{BACKGROUND} is left out (--include-background keeps it)")
    share = t["skipped"] / t["files"] if t["files"] else 0.0
    parts.append(f"training would refuse this data: {r['verdict']}" if r["verdict"] else
                 f"training would accept this data ({share:.1%} of files skipped, "
                 f"--max-bad-fraction {r['max_bad_fraction']:g})")
    return "\n\n".join(parts)
