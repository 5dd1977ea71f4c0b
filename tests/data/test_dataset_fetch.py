"""``trainjob dataset fetch`` and ``dataset upload``: a local HTTP server (in a thread, with
Range support and a switch that cuts a response halfway) plays the publisher; moto_server
is the bucket."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_trainjob
from helpers.jobs import cli_in_subprocess

MiB = 1024**2


class Publisher:
    """Serves ``data`` at /caltech-101.zip; honours Range; ``cut_next`` cuts the next
    response after that many bytes; ``refuse_next`` answers the next GET with that HTTP
    status; ``ranges`` records the Range header of each GET."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.cut_next: int | None = None
        self.refuse_next: int | None = None
        self.honour_range = True
        self.ranges: list[str | None] = []
        publisher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                publisher.ranges.append(self.headers.get("Range"))
                refuse, publisher.refuse_next = publisher.refuse_next, None
                if refuse:
                    self.send_error(refuse)
                    return
                body, start = publisher.data, 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and publisher.honour_range:
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                cut, publisher.cut_next = publisher.cut_next, None
                payload = body[start:] if cut is None else body[start:start + cut]
                self.wfile.write(payload)
                if cut is not None:
                    self.wfile.flush()
                    self.connection.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/caltech-101.zip"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def publisher():
    data = os.urandom(3 * MiB + 12345)
    server = Publisher(data)
    yield server
    server.close()


def errors(stderr: str) -> list[str]:
    """trainjob's error lines (stderr also carries progress and log lines)."""
    return [line for line in stderr.splitlines() if line.startswith("trainjob: error:")]


def fetch_args(publisher, to: str, md5: str | None = None) -> list[str]:
    return ["dataset", "fetch", "caltech101", "--to", to, "--url", publisher.url,
            "--md5", md5 or hashlib.md5(publisher.data).hexdigest()]


def test_fetch_resumes_a_cut_download_and_uploads_multipart(s3, bucket, publisher, tmp_path):
    publisher.cut_next = MiB + 7  # the first response breaks off after ~1 MiB
    args = fetch_args(publisher, f"s3://{bucket}/datasets/")
    first = run_trainjob(args, s3.env(), tmp_path)
    assert first.returncode == 4, first.stderr
    [line] = errors(first.stderr)
    assert "Traceback" not in first.stderr
    assert "broke off" in line and "run the command again to resume" in line
    assert s3.keys(bucket) == {}  # nothing uploaded

    second = run_trainjob(args, s3.env(TRAINJOB_THREADS="4"), tmp_path)
    assert second.returncode == 0, second.stderr
    assert publisher.ranges == [None, f"bytes={MiB + 7}-"]  # only the rest was asked for
    assert s3.read(bucket, "datasets/caltech-101.zip") == publisher.data
    assert f"train with --data s3://{bucket}/datasets/caltech-101.zip" in second.stdout
    # progress: not a TTY, so one line per 10%
    steps = re.findall(r"caltech101 caltech-101.zip: (\d+)%", second.stderr)
    assert steps == [str(p) for p in range(30, 101, 10)]  # resumed at 33%: says so first
    head = s3.client().head_object(Bucket=bucket, Key="datasets/caltech-101.zip")
    assert head["Metadata"]["md5"] == hashlib.md5(publisher.data).hexdigest()

    third = run_trainjob(args, s3.env(), tmp_path)  # all there: no download, no upload
    assert third.returncode == 0 and "(already there)" in third.stdout
    assert len(publisher.ranges) == 2


# A presigned S3 URL's secrets (credential, session token, signature) and an Azure SAS sig,
# URL-encoded as given; MARKS are what must not appear anywhere, encoded or not.
SECRET_QUERY = ("X-Amz-Algorithm=AWS4-HMAC-SHA256"
                "&X-Amz-Credential=AKIDSECRET4711%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
                "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
                "&x-amz-security-token=TOKENSECRET0815&X-Amz-Signature=5ec2e7c0ffee5ec2e7"
                "&sv=2022-11-02&sig=SASSIGSECRET%2Bq%3D")
MARKS = ["AKIDSECRET4711", "TOKENSECRET0815", "5ec2e7c0ffee5ec2e7", "SASSIGSECRET"]


def assert_no_secret(output: str, *folders) -> None:
    for mark in MARKS:
        assert mark not in output, f"{mark} in the output"
        for folder in folders:
            for path in (p for p in folder.rglob("*") if p.is_file()):
                assert mark.encode() not in path.read_bytes(), f"{mark} in {path}"


def test_no_secret_of_a_presigned_url_is_printed_or_kept(s3, bucket, publisher, tmp_path):
    """A presigned or SAS URL is a credential: through an HTTP error, a download that breaks
    off, its resume and the upload, no output line, error or file holds its secrets."""
    url = f"{publisher.url}?{SECRET_QUERY}"
    args = ["-v", "--debug", "dataset", "fetch", "caltech101", "--to", f"s3://{bucket}/d/",
            "--url", url, "--md5", hashlib.md5(publisher.data).hexdigest()]
    publisher.refuse_next = 403
    refused = run_trainjob(args, s3.env(), tmp_path)
    assert refused.returncode == 4, refused.stderr
    [line] = errors(refused.stderr)
    assert "HTTP 403" in line and "X-Amz-Signature=REDACTED" in line and "sig=REDACTED" in line
    assert_no_secret(refused.stdout + refused.stderr, tmp_path)

    publisher.cut_next = MiB
    cut = run_trainjob(args, s3.env(), tmp_path)
    assert cut.returncode == 4 and "broke off" in errors(cut.stderr)[0], cut.stderr
    [sidecar] = tmp_path.rglob("*.part.json")
    kept = json.loads(sidecar.read_text())
    assert kept["url_sha256"] == hashlib.sha256(url.encode()).hexdigest()
    assert kept["url"].startswith(publisher.url) and "REDACTED" in kept["url"]
    assert_no_secret(cut.stdout + cut.stderr, tmp_path)

    resumed = run_trainjob(args, s3.env(), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert publisher.ranges[-1] == f"bytes={MiB}-", publisher.ranges  # the sidecar matched
    assert "resuming" in resumed.stderr and "X-Amz-Credential=REDACTED" in resumed.stderr
    assert s3.read(bucket, "d/caltech-101.zip") == publisher.data
    head = s3.client().head_object(Bucket=bucket, Key="d/caltech-101.zip")
    assert_no_secret(resumed.stdout + resumed.stderr + json.dumps(head["Metadata"]), tmp_path)


def test_multipart_above_the_part_size(s3env, s3, bucket, tmp_path):
    from trainjob.data import upload

    src = tmp_path / "big.zip"
    src.write_bytes(os.urandom(11 * MiB))
    report = upload.upload_path(src, f"s3://{bucket}/d/", part_size=5 * MiB, threads=4)
    assert report.uploaded == 1
    etag = s3.client().head_object(Bucket=bucket, Key="d/big.zip")["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts
    assert s3.read(bucket, "d/big.zip") == src.read_bytes()


def test_an_md5_mismatch_is_exit_3_naming_both_and_uploads_nothing(s3, bucket, publisher,
                                                                  tmp_path):
    wrong = "0" * 32
    result = run_trainjob(fetch_args(publisher, f"s3://{bucket}/datasets/", md5=wrong),
                          s3.env(), tmp_path)
    assert result.returncode == 3
    [line] = errors(result.stderr)
    assert "Traceback" not in result.stderr
    assert wrong in line and hashlib.md5(publisher.data).hexdigest() in line
    assert "nothing was uploaded" in line
    assert s3.keys(bucket) == {}
    leftovers = [p.name for p in tmp_path.rglob("*caltech-101.zip*")]
    assert leftovers == []  # the bad download is gone: the next try starts afresh


def test_fetch_bad_input_fails_before_downloading(s3, publisher, tmp_path):
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, *fetch_args(
        publisher, "s3://no-such-bucket-xyz/datasets/"))
    assert rc == 4 and "no-such-bucket-xyz" in err and heavy == []
    assert publisher.ranges == []
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "fetch", "caltech101",
                                            "--to", "s3://b/x/", "--url", publisher.url)
    assert rc == 2 and "--url needs --md5" in err
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "fetch", "imagenet",
                                            "--to", "s3://b/x/")
    assert rc == 2 and "caltech101" in err


def test_upload_a_folder_in_parallel_then_skip_what_is_there(s3, bucket, class_folders,
                                                             tmp_path):
    uri = f"s3://{bucket}/datasets/caltech/"
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "upload",
                                            str(class_folders.parent), "--to", uri)
    assert rc == 0, err
    assert heavy == []
    files = sorted(p.relative_to(class_folders.parent).as_posix()
                   for p in class_folders.parent.rglob("*") if p.is_file())
    assert sorted(k.removeprefix("datasets/caltech/") for k in s3.keys(bucket)) == files
    assert f"{len(files)} files uploaded" in out
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "upload",
                                            str(class_folders.parent), "--to", uri)
    assert rc == 0 and f"0 files uploaded (0 B), {len(files)} already there" in out


def test_upload_a_missing_path_is_exit_2(s3, bucket, tmp_path):
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "upload",
                                            str(tmp_path / "nope"), "--to",
                                            f"s3://{bucket}/d/")
    assert rc == 2 and "no such file or folder" in err


def test_a_server_that_ignores_range_gets_a_fresh_download(publisher, tmp_path):
    from trainjob.data import httpfetch

    publisher.honour_range = False
    dest = tmp_path / "caltech-101.zip"
    md5 = hashlib.md5(publisher.data).hexdigest()
    publisher.cut_next = 100_000
    with pytest.raises(Exception, match="broke off"):
        httpfetch.fetch_url(publisher.url, dest, md5=md5)
    fetched = httpfetch.fetch_url(publisher.url, dest, md5=md5)
    assert publisher.ranges == [None, "bytes=100000-"]  # asked; got the whole file (200)
    assert (fetched.resumed_from, fetched.downloaded) == (0, len(publisher.data))
    assert dest.read_bytes() == publisher.data


def test_progress_on_a_terminal_is_one_redrawn_bar():
    import io

    from trainjob.inspect.textfmt import ProgressReporter

    out = io.StringIO()
    report = ProgressReporter("caltech101", out, tty=True)
    for done in range(0, 101, 25):
        report.last_draw = 0.0  # as if 0.1 s had passed between chunks
        report(done * MiB, 100 * MiB)
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("100% 100.0 MiB of 100.0 MiB\n")
    assert "[" + "#" * 30 + "]" in text and "\n" not in text[:-1]
