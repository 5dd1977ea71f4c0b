"""End to end, through the real CLI in a subprocess, against real S3 servers over HTTP:
learnability, bad input and storage failures, and the checks every complete run must pass.

The core run (the official zip, killed, resumed, checked against its manifest and pulled
with the stock client) runs on moto and on SeaweedFS in test_resume.py; the prefix of
class folders is the data of its EarlyStopping test."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
import sampledata
from conftest import Result, run_trainjob

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1800)  # 300 steps: ~6 min alone, longer beside another xdist worker
def test_learns_three_solid_colours_with_local_paths(tmp_path):
    """The smallest run that tells learning from not learning (docs/testing.md has the
    runs): 300 steps, because ResNet50's BatchNorm moving statistics (momentum 0.99) need a
    few hundred steps before inference-mode predictions reflect what training learned; of
    8, because a step's cost grows with the batch and batches of 4 leave the statistics
    too noisy. In 3 epochs, not 10: the same steps with fewer checkpoints and validations.
    The default checkpoint monitor (val_loss) picks the final model: the job recomputes its
    BatchNorm statistics over the training images before it evaluates (precise BN), so an
    epoch whose moving statistics lagged answers every class. The same run with the labels
    shuffled fails the assertions."""
    data = tmp_path / "colours"
    sampledata.make_solid_classes(data, per_class=40)
    out = tmp_path / "run"
    result = run_trainjob(["train", "--data", str(data), "--output", str(out), "--epochs", "3",
                           "--image-size", "32", "--batch-size", "8", "--steps-per-epoch",
                           "100", "--threads", "2"],
                          {**_plain_env()}, tmp_path / "home", timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # Chance is 1/3, and so is a model that answers one class for everything; 0.67 is a
    # model that gets a whole class wrong. Every class learned (half its 6 test images at
    # least), and a training loss that fell, is what a broken training cannot show.
    assert metrics["accuracy"] >= 0.6, metrics
    assert min(metrics["per_class_accuracy"].values()) >= 0.5, metrics["per_class_accuracy"]
    assert metrics["warnings"] == [], metrics["warnings"]
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    assert (out / "manifest.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "recalibrate_batchnorm" in config["timings_seconds"], config["timings_seconds"]


def _plain_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TRAINJOB_"))}


# --- bad input: the right exit code, one line on stderr, no traceback, no manifest ----------

def _tar_with(tmp_path: Path, name: str, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        img = io.BytesIO()
        sampledata.image_for(0, 0).save(img, "JPEG")
        for cls in ("a", "b"):
            info = tarfile.TarInfo(f"data/{cls}/x.jpg")
            info.size = len(img.getvalue())
            tar.addfile(info, io.BytesIO(img.getvalue()))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


def _slip_archive(tmp_path: Path) -> Path:
    return _tar_with(tmp_path, "slip.tar.gz", tarfile.TarInfo("../../evil.txt"), b"pwned")


def _link_archive(tmp_path: Path) -> Path:
    link = tarfile.TarInfo("data/a/passwd.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    return _tar_with(tmp_path, "link.tar.gz", link)


def _corrupt_folder(tmp_path: Path) -> Path:
    root = tmp_path / "corrupt"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


WRONG_SECRET = "definitely-wrong-secret-8d1f"
# Failures of the storage itself: each runs on every server (see test_storage_failure...).
STORAGE_FAILURES = {
    "missing bucket": (lambda s3, b, t: ["--data", str(_corrupt_folder(t)),
                                         "--output", "s3://no-such-bucket-here/run"], 4, {}),
    "wrong secret key": (lambda s3, b, t: ["--data", f"s3://{b}/x.zip",
                                           "--output", f"s3://{b}/run"], 4,
                         {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}),
}
BAD_INPUTS = {
    "unreachable endpoint": (lambda s3, b, t: ["--data", f"s3://{b}/x.zip",
                                               "--output", f"s3://{b}/run"], 4,
                             {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "2"}),
    "unknown URI scheme": (lambda s3, b, t: ["--data", "gs://bucket/data.zip",
                                             "--output", f"s3://{b}/run"], 2, {}),
    "empty prefix": (lambda s3, b, t: ["--data", f"s3://{b}/nothing/here/",
                                       "--output", f"s3://{b}/run"], 3, {}),
    "tar-slip archive": (lambda s3, b, t: ["--data", str(_slip_archive(t)),
                                           "--output", f"s3://{b}/run"], 3, {}),
    "link out of archive": (lambda s3, b, t: ["--data", str(_link_archive(t)),
                                              "--output", f"s3://{b}/run"], 3, {}),
    "every image corrupt": (lambda s3, b, t: ["--data", str(_corrupt_folder(t)),
                                              "--output", f"s3://{b}/run"], 3, {}),
    "val fraction 1.5": (lambda s3, b, t: ["--data", "x.zip", "--output", f"s3://{b}/run",
                                           "--val-fraction", "1.5"], 2, {}),
    "unknown option": (lambda s3, b, t: ["--data", "x.zip", "--output", f"s3://{b}/run",
                                         "--no-such-option", "3"], 2, {}),
}


def _assert_fails_cleanly(s3, bucket: str, tmp_path: Path, case: tuple) -> Result:
    make_args, code, env = case
    result = run_trainjob(["train", *make_args(s3, bucket, tmp_path), "--epochs", "1"],
                          s3.env(**env), tmp_path / "home", timeout=180)
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = result.error_lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trainjob: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(k.endswith("manifest.json") for k in s3.keys(bucket))
    assert not _escaped(tmp_path), "a member of the tar-slip archive was written"
    return result


def _escaped(tmp_path: Path) -> list[Path]:
    """Where the tar-slip archive's ``../../evil.txt`` landed, if anywhere: extraction runs
    under TRAINJOB_HOME's cache, deep inside tmp_path, so the whole tree is searched (and
    the folders above it, for a member that climbed higher)."""
    found = list(tmp_path.rglob("evil.txt"))
    return found + [p / "evil.txt" for p in tmp_path.parents[:3] if (p / "evil.txt").exists()]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, s3, bucket, tmp_path):
    _assert_fails_cleanly(s3, bucket, tmp_path, BAD_INPUTS[case])


@pytest.mark.parametrize("case", list(STORAGE_FAILURES))
def test_storage_failure_fails_cleanly(case, server, bucket, tmp_path):
    """Exit 4 in seconds (no retries on a refusal), one line, no secret in any output."""
    started = time.monotonic()
    result = _assert_fails_cleanly(server, bucket, tmp_path, STORAGE_FAILURES[case])
    assert time.monotonic() - started < 30
    line = result.error_lines()[0]
    output = result.stdout + result.stderr
    assert WRONG_SECRET not in output and server.secret_key not in output
    if case == "wrong secret key":
        assert "invalid S3 credentials" in line and "AWS_SECRET_ACCESS_KEY" in line, line
    else:
        assert "no-such-bucket-here" in line and "does not exist" in line, line
