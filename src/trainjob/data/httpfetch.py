"""Downloading one published file over HTTP(S): resumable, checked by size and md5.

The bytes go to ``<name>.part`` in a cache folder, with a sidecar recording the URL (its
sha256, and the URL without its secrets for humans: a presigned or SAS URL is a credential)
and the server's validators (ETag, Last-Modified). A rerun after an interruption asks only for
the rest (``Range``, with ``If-Range`` so a changed file starts over); a server that
ignores ranges gets a fresh download. Only a file whose size and md5 match is renamed to
its final name; one that does not match is deleted and reported (DataError, exit 3).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainjob.errors import DataError, StorageError
from trainjob.store import digests
from trainjob.store.client import redact

log = logging.getLogger(__name__)

CHUNK = 1 << 16
TIMEOUT_SECONDS = 30.0
Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    md5: str
    downloaded: int  # bytes transferred by this call (0: the cached file was reused)
    resumed_from: int  # bytes a partial download had already, 0 if none


def fetch_url(url: str, dest: Path, *, md5: str, size: int | None = None,
              progress: Progress | None = None) -> Fetched:
    """``dest``, downloaded from ``url`` (or found there already) with the given md5 (and
    size, where known)."""
    progress = progress or (lambda done, total: None)
    md5 = md5.lower()
    if dest.is_file() and (size is None or dest.stat().st_size == size) and \
            digests.md5(dest) == md5:
        log.info("%s is already here, checked (md5 %s)", dest, md5)
        return Fetched(dest, dest.stat().st_size, md5, 0, 0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    meta = _read_meta(meta_path, url)
    have = part.stat().st_size if part.is_file() and meta is not None else 0
    resumed_from, downloaded = _download(url, part, meta_path, have, meta or {}, size, progress)
    got_size = part.stat().st_size
    if size is not None and got_size != size:
        _discard(part, meta_path)
        raise DataError(f"{redact(url)}: got {got_size} bytes, expected {size}; the partial "
                        "file was deleted, run the command again")
    digest = digests.md5(part)
    if digest != md5:
        _discard(part, meta_path)
        raise DataError(f"{redact(url)}: md5 {digest} does not match the expected {md5}; "
                        "the file was deleted and nothing was uploaded: check the URL (and "
                        "--md5), then run the command again")
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
    return Fetched(dest, got_size, digest, downloaded, resumed_from)


def _download(url: str, part: Path, meta_path: Path, have: int, meta: dict,
              size: int | None, progress: Progress) -> tuple[int, int]:
    """Append the rest of ``url`` to ``part``; returns (resumed from, bytes transferred)."""
    headers = {"User-Agent": "trainjob"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and size is not None and have >= size:
            return have, 0  # already complete; the checks decide
        raise StorageError(f"{redact(url)}: HTTP {exc.code} {exc.reason}: check the URL") \
            from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(f"cannot download {redact(url)}: {reason}: check the URL and the "
                           "network, then run the command again (it resumes)") from exc
    with response:
        if have and response.status == 206 and _range_start(response) == have:
            mode, start = "ab", have
            log.info("resuming %s at byte %d", redact(url), have)
        else:
            mode, start = "wb", 0  # no partial file, or the server sent the whole file
        total = _total(response, start) or size
        _write_meta(meta_path, url, response, total)
        done, transferred = start, 0
        progress(done, total)
        try:
            with open(part, mode) as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    transferred += len(chunk)
                    progress(done, total)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            raise StorageError(f"download of {redact(url)} broke off after {done} bytes "
                               f"({exc}): run the command again to resume") from exc
    if total is not None and done < total:
        raise StorageError(f"download of {redact(url)} broke off after {done} of {total} "
                           "bytes: run the command again to resume")
    return start, transferred


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _total(response, start: int) -> int | None:
    match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def _read_meta(path: Path, url: str) -> dict | None:
    """The sidecar of a partial download of ``url``; None when there is none (or it is of
    another URL): the partial file is then not trusted."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("url_sha256") == _url_digest(url) \
        else None


def _write_meta(path: Path, url: str, response, total: int | None) -> None:
    path.write_text(json.dumps({"url_sha256": _url_digest(url), "url": redact(url),
                                "etag": response.headers.get("ETag"),
                                "last_modified": response.headers.get("Last-Modified"),
                                "total": total}))


def _url_digest(url: str) -> str:
    """Matches a sidecar to its URL, secrets included, without keeping them on disk."""
    return hashlib.sha256(url.encode()).hexdigest()


def _discard(part: Path, meta_path: Path) -> None:
    part.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
