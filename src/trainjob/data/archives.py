"""Archives on disk: safe extraction (nested too) into shared, reusable extraction folders.

Works on the official ``caltech-101.zip`` as distributed: a zip holding
``101_ObjectCategories.tar.gz`` beside ``Annotations.tar`` and ``__MACOSX`` junk.

Each archive unpacks once into ``<extract_root>/<key>-<name>``, keyed by its path, size and
mtime. Jobs on one host share these folders: ``hostcache.ensure`` lets one job build a folder
while the others wait, and folders of archives that changed or vanished are pruned unless a
live job still uses them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from trainjob.errors import DataError
from trainjob.store import hostcache

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_NESTING = 3
COMPLETE = ".trainjob-complete"  # written last: the folder holds the whole archive
SOURCE = ".trainjob-source"  # the archive's path, written first: tells when it is stale
# tarfile's extraction filters (PEP 706) exist from Python 3.11.4 on; older 3.11 patch
# releases (Debian bookworm's 3.11.2) rely on trainjob's own checks below alone.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or p.startswith("._") or p == ".DS_Store" for p in parts)


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root`` in sorted order, junk and hidden entries left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_junk(d) and not d.startswith("."))
        for name in sorted(filenames):
            if not is_junk(name) and not name.startswith("."):
                yield Path(dirpath) / name


class _Budget:
    """Total bytes all (nested) extractions may write: guards against archive bombs."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def spend(self, n: int, archive: Path) -> None:
        self.used += n
        if self.used > self.limit:
            raise DataError(f"{archive.name} unpacks to more than --max-extract-bytes "
                            f"({self.limit} bytes); raise the limit if the data is genuine")


def _unsafe(archive: Path, what: str) -> DataError:
    return DataError(f"unsafe archive {archive.name}: {what}; refusing to extract it")


def _safe_target(dest: Path, name: str, archive: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (name[1:2] == ":"):
        raise _unsafe(archive, f"member {name!r} points outside the extraction folder")
    target = (dest / pure).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise _unsafe(archive, f"member {name!r} escapes the extraction folder")
    return target


def _check_link(dest: Path, name: str, link: str, archive: Path) -> None:
    base = PurePosixPath(name).parent
    if PurePosixPath(link).is_absolute() or \
            not (dest / base / link).resolve().is_relative_to(dest.resolve()):
        raise _unsafe(archive, f"link {name!r} -> {link!r} points outside the extraction folder")


def _check_on_disk(dest: Path, m: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a member that, through the links already extracted, lands or points outside.

    The checks by name alone are fooled by chains (``a -> .``, then ``a/zzz -> ..``); this
    one resolves against what is really on disk just before the member is written.
    """
    pure = PurePosixPath(m.name.replace("\\", "/"))
    parent = Path(os.path.realpath(dest / pure.parent))
    # A symlink member replaces whatever is at its path; anything else is written through it.
    where = parent / pure.name if m.issym() else Path(os.path.realpath(parent / pure.name))
    paths = [where]
    if m.issym():
        paths.append(Path(os.path.realpath(parent / m.linkname)))
    elif m.islnk():
        paths.append(Path(os.path.realpath(dest / m.linkname)))  # os.link follows links
    if not all(p.is_relative_to(dest) for p in paths):
        link = f" -> {m.linkname!r}" if m.issym() or m.islnk() else ""
        raise _unsafe(archive, f"{m.name!r}{link} leads outside the extraction folder "
                               "through links extracted before it")


def _check_links_inside(dest: Path, archive: Path) -> None:
    """A later link can redirect an earlier one (``l -> b/../x``, then ``b -> .``): check
    where every link points once everything is on disk."""
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(dest):
                raise _unsafe(archive, f"link {path.relative_to(dest).as_posix()!r} ends up "
                                       "pointing outside the extraction folder")


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                _safe_target(dest, m.name, archive)
                if m.isdev() or m.isfifo():
                    raise _unsafe(archive, f"{m.name!r} is a device or fifo")
                if m.issym():
                    _check_link(dest, m.name, m.linkname, archive)
                elif m.islnk():
                    _safe_target(dest, m.linkname, archive)
                budget.spend(m.size, archive)
                if not is_junk(m.name):
                    members.append(m)
            real_dest = Path(os.path.realpath(dest))
            for m in members:  # one at a time, each checked against the disk as it is now
                _check_on_disk(real_dest, m, archive)
                # Folder modes are left alone: a read-only folder would stop its own members.
                tar.extract(m, dest, set_attrs=not m.isdir(), **_TAR_FILTER)
            _check_links_inside(real_dest, archive)
    except _TAR_FILTER_ERROR as exc:
        raise _unsafe(archive, str(exc)) from exc
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
                    raise _unsafe(archive, f"{info.filename!r} is a device or fifo")
                budget.spend(info.file_size, archive)
                if info.is_dir() or is_junk(info.filename):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                # zipfile stops at the declared size, so the budget check above holds.
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"cannot read archive {archive.name}: {exc}; re-upload it") from exc


def _folder_name(archive: Path) -> str:
    st = archive.stat()
    key = f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{hashlib.sha1(key.encode()).hexdigest()[:16]}-{archive.name}"


def extract(archive: Path, extract_root: Path, budget: _Budget) -> Path:
    """Unpack ``archive`` under ``extract_root`` once; a complete earlier unpack is reused."""
    dest = extract_root / _folder_name(archive)
    marker = dest / COMPLETE
    before = budget.used

    def build() -> None:
        if dest.exists():
            _rmtree(dest)  # a crash mid-extract leaves a partial folder: start over
        dest.mkdir(parents=True)
        (dest / SOURCE).write_text(str(archive.resolve()))
        log.info("extracting %s", archive.name)
        try:
            if archive.name.lower().endswith(".zip"):
                _extract_zip(archive, dest, budget)
            else:
                _extract_tar(archive, dest, budget)
        except DataError:
            _rmtree(dest)  # leave nothing of a refused archive behind, links least of all
            raise
        marker.write_text(str(budget.used - before))

    if not hostcache.ensure(dest, ready=marker.exists, build=build):
        budget.spend(int(marker.read_text() or 0), archive)
    return dest


def unpack(source: Path, extract_root: Path, max_bytes: int) -> list[Path]:
    """Folders holding the source's files with every archive in it unpacked (nested too).

    Within a ``hostcache.session()`` each extraction folder stays locked (shared) for the run.
    """
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
            found += [p for p in walk_files(item) if is_archive(p)]
        frontier = found
        if not frontier:
            _prune_extractions(extract_root, roots)
            return roots
    raise DataError(f"{source.name}: archives nested more than {MAX_NESTING} deep")


def _prune_extractions(extract_root: Path, keep: list[Path]) -> None:
    """Remove extraction folders whose archive changed or is gone, and partial ones a killed
    job left, unless a live job on this host still uses them."""
    if not extract_root.is_dir():
        return
    stale = [d for d in sorted(extract_root.iterdir())
             if d.is_dir() and not d.name.startswith(".") and d not in keep and _is_stale(d)]
    for folder in hostcache.prune(stale):
        log.info("removed the old extraction folder %s", folder)


def _is_stale(folder: Path) -> bool:
    source = folder / SOURCE
    if not (folder / COMPLETE).exists():
        return True  # half-done by a killed job; one still extracting holds its lock
    if not source.is_file():
        return False  # made before sources were recorded: nothing tells it is stale
    archive = Path(source.read_text().strip())
    return not archive.is_file() or _folder_name(archive) != folder.name


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
