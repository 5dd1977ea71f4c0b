"""Host-local caches shared by concurrent jobs: real processes, real folders, real S3 (moto
over HTTP). A second job must never delete or rewrite a cache folder the first one is
building or using, and housekeeping must skip whatever a live job holds."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from trainjob.data import archives
from trainjob.data.catalog import scan
from trainjob.store import fetch
from trainjob.store.mirror import FetchResult

ROOT = Path(__file__).resolve().parents[2]
GB = 10**9
DAY = 86_400


class Job:
    """A second trainjob process on this host: runs ``code``, prints 'ready', then waits
    until ``finish()`` (its stdin closes), and prints its last line as JSON."""

    def __init__(self, code: str, env: dict[str, str] | None = None) -> None:
        prelude = "import json, sys, time\nfrom pathlib import Path\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**(env or os.environ), "PYTHONPATH": str(ROOT / "src")})

    def wait_ready(self, timeout: float = 60) -> None:
        line = _readline(self.proc, timeout)
        assert line.strip() == "ready", f"{line!r}; stderr: {self.proc.stderr.read()}"

    def finish(self, timeout: float = 60):
        out, err = self.proc.communicate("", timeout=timeout)
        assert self.proc.returncode == 0, err
        lines = out.strip().splitlines()
        return json.loads(lines[-1]) if lines else None


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        proc.kill()
        raise AssertionError(f"no 'ready' within {timeout}s")
    return result[0]


def jpeg(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (level, 255 - level, 90)).save(buf, "JPEG")
    return buf.getvalue()


def make_archive(path: Path, n: int = 40, salt: int = 0) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            data = jpeg((i * 5 + salt) % 256)
            info = tarfile.TarInfo(f"data/{'cats' if i % 2 else 'dogs'}/image_{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --- extraction folders -----------------------------------------------------------------------

UNPACK_PAUSED = """
    import fcntl, tarfile
    from trainjob.data import archives
    archive, extract_root, flags, name, pause_at = {args}
    real_flock = fcntl.flock

    def flock(fd, operation):  # the real flock; <name>.waiting when another job holds it
        if not operation & fcntl.LOCK_NB:
            try:
                return real_flock(fd, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                (Path(flags) / f"{{name}}.waiting").touch()
        return real_flock(fd, operation)

    fcntl.flock = flock
    real = tarfile.TarFile._extract_member
    done = [0]

    def extract_member(self, *args, **kwargs):  # the real extraction, paused after member N
        real(self, *args, **kwargs)
        done[0] += 1
        if done[0] == int(pause_at):
            (Path(flags) / f"{{name}}.paused").touch()
            while not (Path(flags) / f"{{name}}.go").exists():
                time.sleep(0.02)

    tarfile.TarFile._extract_member = extract_member
    roots = archives.unpack(Path(archive), Path(extract_root), 10**9)
    print(json.dumps(sorted(p.name for r in roots for p in r.rglob("*.jpg"))))
"""


def wait_for(path: Path, timeout: float) -> bool:
    return first_of([path], timeout) == path


def first_of(paths: list[Path], timeout: float) -> Path | None:
    """The first of ``paths`` to exist (checked in order), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in paths:
            if path.exists():
                return path
        time.sleep(0.02)
    return None


def test_second_job_never_deletes_an_extraction_in_progress(tmp_path):
    """Job A has extracted every member but not yet marked the folder complete; job B starts
    on the same archive. B must wait for A, not wipe A's folder and start over under it."""
    archive = make_archive(tmp_path / "data.tar", n=40)
    flags = tmp_path / "flags"
    flags.mkdir()
    extract_root = tmp_path / "cache" / "extracted"

    def start(name: str, pause_at: int) -> subprocess.Popen:
        args = repr([str(archive), str(extract_root), str(flags), name, str(pause_at)])
        return subprocess.Popen([sys.executable, "-c", "import json, sys, time\n"
                                 "from pathlib import Path\n"
                                 + textwrap.dedent(UNPACK_PAUSED.format(args=args))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})

    jobs: list[subprocess.Popen] = []
    try:
        job_a = start("a", 40)  # paused after its last member, before the completion marker
        jobs.append(job_a)
        assert wait_for(flags / "a.paused", 60)
        job_b = start("b", 1)  # would pause after its first member, if it extracted at all
        jobs.append(job_b)
        # B either finds A's lock held (b.waiting) or, unguarded, extracts (b.paused):
        # whichever comes first says whether B reached the lock while A still held it.
        reached = first_of([flags / "b.waiting", flags / "b.paused"], 60)
        assert reached == flags / "b.waiting", f"job B did not wait for job A's lock: {reached}"
        assert job_b.poll() is None and not (flags / "b.paused").exists(), "B stopped waiting"
        (flags / "a.go").touch()
        out_a, err_a = job_a.communicate(timeout=60)
        (flags / "b.go").touch()
        out_b, err_b = job_b.communicate(timeout=60)
        assert job_a.returncode == 0, err_a
        assert job_b.returncode == 0, err_b
        assert len(json.loads(out_a)) == 40, "job A's extraction was wiped under it by job B"
        assert len(json.loads(out_b)) == 40
    finally:  # a failed assertion leaves the jobs paused on their flags
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.communicate()
    assert not (flags / "b.paused").exists(), "job B extracted again what job A had built"


def test_pruning_skips_a_folder_another_process_uses(tmp_path):
    from trainjob.store import hostcache

    folder = tmp_path / "cache" / "extracted" / "abc-data.tar"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "x.jpg").write_bytes(b"x")
    job = Job(f"""
        from trainjob.store import hostcache
        with hostcache.session():
            with hostcache.using(Path({str(folder)!r})):
                pass
            print("ready", flush=True)
            sys.stdin.read()
        """)
    job.wait_ready()
    assert hostcache.prune([folder]) == []
    assert (folder / "data" / "x.jpg").read_bytes() == b"x"
    job.finish()
    assert hostcache.prune([folder]) == [folder]
    assert not folder.exists()


def test_a_job_that_must_rebuild_a_folder_it_holds_fails_instead_of_hanging(tmp_path):
    from trainjob.store import hostcache

    folder = tmp_path / "cache" / "extracted" / "abc-data.tar"
    with hostcache.session():
        assert hostcache.ensure(folder, ready=lambda: False, build=folder.mkdir) is True
        assert hostcache.ensure(folder, ready=folder.is_dir, build=folder.mkdir) is False
        with pytest.raises(RuntimeError, match="this job holds it"):
            hostcache.ensure(folder, ready=lambda: False, build=folder.mkdir)
    assert hostcache.prune([folder]) == [folder]  # the session let go of everything it held


HOLD_UNPACK = """
    from trainjob.data import archives
    try:
        from trainjob.store.hostcache import session
    except ImportError:  # before trainjob.store.hostcache existed: nothing to hold
        from contextlib import nullcontext as session
    with session():
        roots = archives.unpack(Path({archive!r}), Path({root!r}), 10**9)
        print("ready", flush=True)
        sys.stdin.read()
        print(json.dumps(sorted(p.name for r in roots for p in r.rglob("*.jpg"))))
"""


def test_old_extractions_are_pruned_unless_a_live_job_uses_them(tmp_path):
    archive = make_archive(tmp_path / "data.tar", n=10)
    extract_root = tmp_path / "cache" / "extracted"
    job = Job(HOLD_UNPACK.format(archive=str(archive), root=str(extract_root)))
    job.wait_ready()
    [old] = [p for p in extract_root.iterdir() if not p.name.startswith(".")]

    make_archive(archive, n=12, salt=3)  # the dataset is replaced in place
    os.utime(archive, (time.time() + 5, time.time() + 5))
    new_roots = archives.unpack(archive, extract_root, GB)
    assert old.is_dir() and len(list(old.rglob("*.jpg"))) == 10, "pruned while in use"
    assert len(job.finish()) == 10  # job A read its whole extraction to the end

    archives.unpack(archive, extract_root, GB)
    assert not old.exists(), "the extraction of the replaced archive was never pruned"
    assert [p for p in extract_root.iterdir() if not p.name.startswith(".")] == new_roots
    assert len(list(new_roots[0].rglob("*.jpg"))) == 12


# --- converted images -----------------------------------------------------------------------

def cmyk_classes(root: Path) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(root / cls / f"{i}.jpg")
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK").save(root / "a" / "odd.jpg")
    return root


def test_unused_converted_images_are_pruned_unless_a_live_job_uses_them(tmp_path):
    root = cmyk_classes(tmp_path / "classes")
    converted = tmp_path / "cache" / "converted"
    job = Job(f"""
        from trainjob.data.catalog import scan
        try:
            from trainjob.store.hostcache import session
        except ImportError:
            from contextlib import nullcontext as session
        with session():
            scan(Path({str(root)!r}), Path({str(converted)!r}))
            print("ready", flush=True)
            sys.stdin.read()
        """)
    job.wait_ready()
    [used] = [p for p in converted.iterdir() if p.suffix == ".png"]
    orphan = converted / "0123456789abcdef0123.png"  # from a dataset no job has used for long
    Image.new("RGB", (4, 4)).save(orphan)
    month_ago = time.time() - 30 * DAY
    for path in (orphan, used):
        os.utime(path, (month_ago, month_ago))
    inode = used.stat().st_ino

    scan(root, converted)
    assert orphan.exists(), "pruned while another job on this host uses the folder"
    job.finish()

    catalog = scan(root, converted)
    assert not orphan.exists(), "an unused converted image was never pruned"
    assert str(used) in [s.path for s in catalog.samples]
    assert used.stat().st_ino == inode, "an image in use was pruned, then converted again"


# --- the download cache ---------------------------------------------------------------------

HOLD_FETCH = """
    from trainjob.store import fetch
    try:
        from trainjob.store.hostcache import session
    except ImportError:
        from contextlib import nullcontext as session
    with session():
        result = fetch.fetch({uri!r}, Path({cache!r}), 2)
        print("ready", flush=True)
        sys.stdin.read()
        files = sorted(p for p in result.path.rglob("*") if p.is_file())
        print(json.dumps({{p.relative_to(result.path).as_posix(): p.read_text() for p in files}}))
"""


def test_a_prefix_in_use_is_not_rewritten_until_the_job_using_it_ends(s3env, bucket, tmp_path,
                                                                     caplog):
    caplog.set_level(logging.WARNING, logger="trainjob.store.hostcache")
    client = s3env.client()
    for name in ("a/1.jpg", "a/2.jpg", "b/1.jpg"):
        client.put_object(Bucket=bucket, Key=f"data/{name}", Body=f"v1 {name}".encode())
    uri, cache_dir = f"s3://{bucket}/data/", tmp_path / "cache"
    job = Job(HOLD_FETCH.format(uri=uri, cache=str(cache_dir)), env=s3env.env())
    job.wait_ready()

    client.delete_object(Bucket=bucket, Key="data/a/2.jpg")
    client.put_object(Bucket=bucket, Key="data/b/1.jpg", Body=b"v2 b/1.jpg")
    second: list[FetchResult] = []
    fetcher = threading.Thread(target=lambda: second.append(fetch.fetch(uri, cache_dir, 2)))
    fetcher.start()
    mirror = cache_dir / "s3" / bucket / "data"
    try:
        # The second fetch says when it found the prefix in use and started to wait: wait
        # for that line (or for the fetch to end without it), then check it is still waiting.
        deadline = time.monotonic() + 60
        while fetcher.is_alive() and not _waiting_logged(caplog) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting_logged(caplog), "the second fetch never waited for the job using it"
        assert fetcher.is_alive(), "the second fetch stopped waiting while the job runs"
        assert (mirror / "a" / "2.jpg").exists(), "deleted under a running job"
        assert (mirror / "b" / "1.jpg").read_text() == "v1 b/1.jpg", "rewritten under a job"
    finally:
        seen = job.finish()
        fetcher.join(60)
    assert seen == {"a/1.jpg": "v1 a/1.jpg", "a/2.jpg": "v1 a/2.jpg", "b/1.jpg": "v1 b/1.jpg"}
    assert second and second[0].downloaded_objects == 1
    assert sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file()) \
        == ["a/1.jpg", "b/1.jpg"]
    assert (mirror / "b" / "1.jpg").read_text() == "v2 b/1.jpg"


def _waiting_logged(caplog) -> bool:
    return any("in use by another job on this host; waiting" in r.getMessage()
               for r in caplog.records)
