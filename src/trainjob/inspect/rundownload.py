"""Downloading a run folder, every file checked against its ``manifest.json``.

Each file goes to a hidden temporary name, is checked (size, then sha256) and only then
renamed into place: a file under its real name in the target folder is always the one the
run published. Files already there with the right hash are not downloaded again.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trainjob.errors import ConfigError, StorageError
from trainjob.run.folder import BEST, MANIFEST, MODEL, NOT_PUBLISHED, TENSORBOARD, sha256
from trainjob.store.base import Store, check_inside

log = logging.getLogger(__name__)

# --only groups: a published file belongs to the first group whose prefix it has; the rest
# (status, config, classes, metrics, the CSV, history, the pictures) are the logs.
GROUP_PREFIXES = {"model": MODEL.split("/")[0] + "/", "checkpoints": BEST.split("/")[0] + "/",
                  "tensorboard": TENSORBOARD + "/"}
GROUPS = ("model", "checkpoints", "tensorboard", "logs")


@dataclass
class DownloadReport:
    """What ``download_run`` did."""

    target: Path
    verified: bool  # checked against manifest.json (False: --allow-unfinished, no manifest)
    downloaded: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)
    bytes: int = 0


@dataclass(frozen=True)
class Problem:
    rel: str
    reason: str


def group_of(rel: str) -> str:
    """The --only group of a run file."""
    for group, prefix in GROUP_PREFIXES.items():
        if rel.startswith(prefix):
            return group
    return "logs"


def parse_only(text: str | None) -> tuple[str, ...]:
    """``model,logs`` -> ('model', 'logs'); every group when ``text`` is empty."""
    if not text:
        return GROUPS
    groups = tuple(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ConfigError(f"--only {text!r}: unknown group {', '.join(unknown) or '(none)'}; "
                          f"use a comma-separated list of {', '.join(GROUPS)}")
    return groups


def download_run(store: Store, target: Path, *, only: tuple[str, ...] = GROUPS,
                 allow_unfinished: bool = False, threads: int = 16) -> DownloadReport:
    """Download the run folder ``store`` into ``target``, checked against its manifest.

    No manifest means the run is unfinished: ConfigError, unless ``allow_unfinished``, which
    downloads what exists (published files only: no resume state, lock or temporaries),
    unchecked. Any file that fails its check is named in one StorageError (exit 4).
    """
    manifest = store.read_json(MANIFEST)
    if manifest is None:
        if not allow_unfinished:
            raise ConfigError(f"{store.child(MANIFEST)} does not exist: the run is unfinished "
                              "(or this is no run folder); pass --allow-unfinished to "
                              "download what is there, unchecked")
        expected = {o.key: None for o in store.list()
                    if not o.key.startswith(NOT_PUBLISHED) and "/." not in o.key}
    else:
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise StorageError(f"{store.child(MANIFEST)} is not a trainjob manifest (no "
                               "'files'): check the URI")
        expected = {rel: entry for rel, entry in files.items() if isinstance(entry, dict)}
    wanted = {rel: entry for rel, entry in sorted(expected.items()) if group_of(rel) in only}
    if not wanted:
        raise ConfigError(f"nothing to download from {store.uri} for --only "
                          f"{','.join(only)}")
    target.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(target, verified=manifest is not None)
    counting = threading.Lock()

    def fetch_one(item: tuple[str, dict | None]) -> Problem | None:
        rel, entry = item
        dest = check_inside(target, target / rel, store.child(rel))
        if entry is not None and dest.is_file() and _problem(dest, entry) is None:
            with counting:
                report.already_there.append(rel)
            return None
        tmp = dest.with_name(f".{dest.name}.download")
        try:
            store.get(rel, tmp)
        except StorageError as exc:
            return Problem(rel, str(exc))
        reason = _problem(tmp, entry) if entry is not None else None
        if reason:
            tmp.unlink(missing_ok=True)
            return Problem(rel, reason)
        size = tmp.stat().st_size
        os.replace(tmp, dest)
        with counting:
            report.bytes += size
            report.downloaded.append(rel)
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        problems = [p for p in pool.map(fetch_one, wanted.items()) if p is not None]
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more: " + ", ".join(
            p.rel for p in problems[1:6]) + ")" if len(problems) > 1 else ""
        raise StorageError(f"{len(problems)} of {len(wanted)} files from {store.uri} failed "
                           f"their check against manifest.json: {first.rel}: {first.reason}"
                           f"{more}. Files that failed were not written to {target}; the "
                           "objects in the bucket changed or are damaged")
    report.downloaded.sort()
    report.already_there.sort()
    return report


def _problem(path: Path, entry: dict) -> str | None:
    """Why ``path`` is not the file ``entry`` (the manifest's size and sha256) describes."""
    size = path.stat().st_size
    if entry.get("size") is not None and size != entry["size"]:
        return f"size {size} bytes, the manifest says {entry['size']}"
    digest = sha256(path)
    if entry.get("sha256") and digest != entry["sha256"]:
        return f"sha256 {digest}, the manifest says {entry['sha256']}"
    return None
