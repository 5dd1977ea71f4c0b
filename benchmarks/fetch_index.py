"""The cache bookkeeping of a prefix fetch at a million keys, without the network.

A synthetic listing of N keys (1,000 folders, in S3's key order) goes through the real
``mirror.sync_prefix`` with a stand-in reader that downloads nothing: it creates an empty
file (size 0 in the listing). What is timed is the bookkeeping: the merge of listing and
index, the size check of each cached file, the index's journal and writes, the removal of
deleted objects; in ``cold`` also the work queue and the creation of the empty files. The
folder is on tmpfs where there is one: a million file creations on a slow disk would measure
the disk.

Scenarios, each in a fresh process so its peak memory is its own:
- ``cold``: empty folder and index, every object "downloaded" (created, recorded) once;
- ``warm``: nothing changed, everything from cache;
- ``changed``: 1% of the objects changed, 1% deleted, 1% new;
- ``old-warm``: the previous design on the same folder: the whole JSON index loaded, two
  stats per object, the JSON rewritten, and ``_prune``'s sorted walk of the tree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZES = (100_000, 1_000_000)
FOLDERS = 1000


def listing(n: int, changed: int = 0, deleted: int = 0, added: int = 0):
    """(key, etag, size) rows in key order; every 100th object is changed, deleted or new
    as asked (spread out, as real edits would be)."""
    per = n // FOLDERS
    for i in range(n):
        key = f"c{i // per:04d}/i{i:07d}.jpg"
        if deleted and i % 100 == 1 and i // 100 < deleted:
            continue
        etag = f"{i:032x}" if not (changed and i % 100 == 0 and i // 100 < changed) \
            else f"{i + 1:032x}"
        yield key, etag, 0
        if added and i % 100 == 2 and i // 100 < added:
            yield key[:-4] + "n.jpg", f"{i:032x}", 0


class NoNetwork:
    """A reader that downloads nothing: the file is made empty, as listed."""

    bucket = "bench"

    def download(self, key: str, size: int, etag: str, dest: Path) -> tuple[str, int]:
        if not dest.exists():
            os.close(os.open(dest, os.O_CREAT | os.O_WRONLY, 0o644))
        return etag, size


def scenario(name: str, n: int, work: Path) -> dict:
    from trainjob.store import mirror
    from trainjob.store.cacheindex import CacheIndex

    cache = work / "cache"
    root = cache / "s3" / "bench" / "data"
    rows = {"cold": lambda: listing(n), "warm": lambda: listing(n),
            "changed": lambda: listing(n, n // 100, n // 100, n // 100)}.get(name)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if name == "old-warm":
        counts = old_warm(root, cache, listing(n))
    else:
        with CacheIndex.for_prefix(cache, "bench", "data/") as index:
            c = mirror.sync_prefix(NoNetwork(), rows(), lambda: sorted(rows()), "data/",
                                     index, threads=4)
        counts = {"recorded": c.downloaded_objects, "cached": c.cached_objects,
                  "removed": c.removed_objects}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"scenario": name, "keys": n, "seconds": round(seconds, 2),
            "us_per_key": round(seconds / n * 1e6, 2),
            "peak_rss_mib": round(peak / 1024, 1),
            "rss_growth_mib": round((peak - base_rss) / 1024, 1), **counts}


def old_warm(root: Path, cache: Path, rows) -> dict:
    """The bookkeeping of the previous fetch, verbatim in substance (one JSON index)."""
    index_path = cache / "old-index.json"
    if not index_path.exists():  # built once, outside the timing's point: it is its input
        index_path.write_text(json.dumps({k: [e, s] for k, e, s in rows}))
        return {"built": True}
    index = json.loads(index_path.read_text())
    cached, keep = 0, set()
    for key, etag, size in rows:
        local = root / key
        keep.add(key)
        if index.get(key) == [etag, size] and local.is_file() \
                and local.stat().st_size == size:
            cached += 1
    index_path.write_text(json.dumps(index))
    for path in sorted(root.rglob("*"), reverse=True):  # _prune
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return {"cached": cached}


def run_child(name: str, n: int, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--scenario", name, "--keys", str(n),
                          "--work", str(work)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(sizes: tuple[int, ...] = SIZES) -> dict:
    results: dict = {"sizes": list(sizes), "runs": []}
    for n in sizes:
        # Creating a file takes ~1 ms on this machine's disk, ~50 us on tmpfs.
        shm = Path("/dev/shm")
        work = Path(tempfile.mkdtemp(prefix="bench-index-",
                                     dir=shm if os.access(shm, os.W_OK) else None))
        try:
            for name in ("cold", "warm"):
                results["runs"].append(run_child(name, n, work))
            run_child("old-warm", n, work)  # builds its JSON index, untimed
            results["runs"].append(run_child("old-warm", n, work))
            results["runs"].append(run_child("changed", n, work))
            index_files = list((work / "cache" / "index").glob("*.sqlite"))
            results.setdefault("index_mib", {})[n] = round(
                sum(p.stat().st_size for p in index_files) / 2**20, 1)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    last = [r for r in results["runs"] if r["keys"] == sizes[-1]]
    warm = next(r for r in last if r["scenario"] == "warm")
    old = next(r for r in last if r["scenario"] == "old-warm")
    print(f"RESULT fetch_index: {sizes[-1]:,} keys unchanged: {warm['seconds']} s, "
          f"peak RSS {warm['peak_rss_mib']} MiB (previous design: {old['seconds']} s, "
          f"{old['peak_rss_mib']} MiB)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario")
    parser.add_argument("--keys", type=int)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.scenario:
        print(json.dumps(scenario(args.scenario, args.keys, args.work)))
    else:
        main((args.keys,) if args.keys else SIZES)
