"""``trainjob dataset``: look at a dataset the way training sees it, fetch, upload and pack
one."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import click

from trainjob.commands import options
from trainjob.commands.datasetpack import pack
from trainjob.config import DataConfig
from trainjob.data import httpfetch, packed, source
from trainjob.data.catalog import BACKGROUND
from trainjob.data.upload import target_key, upload_path
from trainjob.errors import ConfigError, DataError
from trainjob.inspect import datasetreport, textfmt
from trainjob.store.s3 import S3Store

log = logging.getLogger(__name__)


@click.group(name="dataset")
def dataset() -> None:
    """Inspect, fetch and upload datasets (never imports TensorFlow)."""
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
    training. Exit 3 when training would refuse the data. A packed dataset (a prefix
    holding index.json) is described from its index: classes, images and shards per split,
    the files the pack skipped; nothing is downloaded or scanned."""
    # The same checks train's options get (URI scheme, ranges), with the same messages.
    DataConfig(data=uri, include_background=include_background, cache_dir=cache_dir,
               max_extract_bytes=max_extract_bytes, max_bad_fraction=max_bad_fraction)
    store = packed.packed_store(uri, threads)
    if store is not None:
        report = datasetreport.packed_report(uri, packed.read_index(store))
        click.echo(json.dumps(report, indent=2) if as_json else render_packed(report))
        return
    catalog, _ = source.load_catalog(
        uri, Path(cache_dir), include_background=include_background,
        max_extract_bytes=max_extract_bytes, max_bad_fraction=None, threads=threads,
        scan_threads=source.scan_threads())
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
    title = (f"{r['uri']}: {t['classes']} classes, {t['images']} usable images, "
             f"{t['skipped']} skipped, of {t['files']} files (class root {r['class_root']})")
    parts = [title, textfmt.table(["CLASS", "IMAGES", "SKIPPED"], rows, right=(1, 2))]
    stats = r["image_stats"]
    sizes = stats["size_range"]
    if sizes:
        modes = ", ".join(f"{m} {n}" for m, n in stats["modes"].items())
        parts.append(f"image sizes: width {sizes['min_width']}-{sizes['max_width']} px, "
                     f"height {sizes['min_height']}-{sizes['max_height']} px\n"
                     f"grayscale: {stats['grayscale']}, CMYK: {stats['cmyk']}, "
                     f"converted to RGB for training: {t['converted_to_rgb']}\n"
                     f"modes: {modes}")
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


def render_packed(r: dict) -> str:
    """The text of ``dataset inspect`` for a packed dataset."""
    t, p = r["totals"], r["packed"]
    title = (f"{r['uri']}: packed dataset ({p['format']} version {p['version']}, created "
             f"{p['created']} from {p['source']}, --max-side {p['max_side']}): "
             f"{t['classes']} classes, {t['images']} images in {t['shards']} shards "
             f"({textfmt.size(t['bytes'])}), {t['skipped']} files skipped")
    rows = [[name, s["images"], s["shards"], textfmt.size(s["bytes"]),
             f"{s['min_per_shard']}-{s['max_per_shard']}"] for name, s in r["splits"].items()]
    split = r["split"]
    how = (f"--train-per-class {split['train_per_class']}" if split["train_per_class"]
           else f"--val-fraction {split['val_fraction']:g} --test-fraction "
                f"{split['test_fraction']:g}")
    parts = [title,
             textfmt.table(["SPLIT", "IMAGES", "SHARDS", "BYTES", "PER SHARD"], rows,
                           right=(1, 2, 3, 4)),
             (f"split: --seed {split['seed']} {how}"
              f"{' --include-background' if split['include_background'] else ''}"),
             "classes: " + ", ".join(r["classes"])]
    if r["skipped_files"]:
        parts.append(f"unreadable or not images ({len(r['skipped_files'])}, skipped by the "
                     "pack)\n" + textfmt.table(
                         ["FILE", "REASON"],
                         [[s["path"], s["reason"]] for s in r["skipped_files"]]))
    return "\n\n".join(parts)


dataset.add_command(pack)


@dataset.command(name="fetch")
@click.argument("name", type=click.Choice(sorted(source.PUBLISHED)))
@options.env_option("--to", "to", name="to", required=True, metavar="URI",
                    help="Where to store the archive: s3://bucket/prefix/ (keeps the file "
                    "name), s3://bucket/key, or a local folder or path.")
@options.env_option("--url", name="url", help="Download from here instead of the "
                    "publisher's URL (a mirror); give --md5 with it.")
@options.env_option("--md5", name="md5", help="The md5 the download must have (default: "
                    "the published one).")
@options.from_config("cache_dir")
@options.threads
def fetch(name: str, to: str, url: str | None, md5: str | None, cache_dir: str,
          threads: int) -> None:
    """Download the published archive NAME (resumable, size and md5 checked) and upload it
    to --to as it is, multipart; train then takes --data with the URI it prints."""
    archive = source.PUBLISHED[name]
    if url and not md5:
        raise ConfigError("--url needs --md5: the download is checked against it")
    if md5 and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise ConfigError(f"--md5 {md5!r} is not an md5 (32 hex digits)")
    # Fail on a bad --to before a long download.
    store, key = target_key(to, archive.filename)
    if isinstance(store, S3Store):
        store.check_bucket()
    dest = Path(cache_dir) / "downloads" / "published" / name / archive.filename
    stream = click.get_text_stream("stderr")
    progress = textfmt.ProgressReporter(f"{name} {archive.filename}", stream,
                                        tty=stream.isatty())
    fetched = httpfetch.fetch_url(url or archive.url, dest, md5=md5 or archive.md5,
                                  size=None if url else archive.size, progress=progress)
    click.echo(f"{archive.filename}: {fetched.size} bytes, md5 {fetched.md5} (checked)",
               err=True)
    report = upload_path(fetched.path, store.child(key), threads=threads,
                                    md5=fetched.md5)
    state = "uploaded" if report.uploaded else "already there"
    click.echo(f"{report.uris[0]} ({state}); train with --data {report.uris[0]}")


@dataset.command(name="upload")
@click.argument("path", type=click.Path(path_type=Path))
@options.env_option("--to", "to", name="to", required=True, metavar="URI",
                    help="s3://bucket/prefix/ (a file keeps its name, a folder its layout "
                    "under it) or s3://bucket/key for one file.")
@options.threads
def upload(path: Path, to: str, threads: int) -> None:
    """Upload a dataset archive or folder PATH to --to: files in parallel, large ones
    multipart; files already stored with the same size and md5 are skipped."""
    report = upload_path(path, to, threads=threads)
    target = report.uris[0] if len(report.uris) == 1 else to
    click.echo(f"{report.uploaded} files uploaded ({textfmt.size(report.bytes)}), "
               f"{report.skipped} already there: {target}")
