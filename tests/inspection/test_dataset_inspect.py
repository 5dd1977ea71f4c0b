"""``trainjob dataset inspect`` against datasets in moto_server over HTTP, compared with
what the training path (``job._load_data``) makes of the same data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import upload_tree
from helpers.jobs import cli_in_subprocess

from trainjob import job
from trainjob.cli import cli
from trainjob.config import Config
from trainjob.run import configfile


@pytest.fixture
def data_uri(request, s3env, s3, bucket, class_folders, official_zip) -> str:
    """The same sample data, as the official zip or as a prefix of class folders."""
    if request.param == "zip":
        s3.client().upload_file(str(official_zip), bucket, "datasets/caltech-101.zip")
        return f"s3://{bucket}/datasets/caltech-101.zip"
    upload_tree(s3, bucket, class_folders.parent, "datasets/caltech/")
    return f"s3://{bucket}/datasets/caltech/"


@pytest.mark.parametrize("data_uri", ["zip", "prefix"], indirect=True)
def test_inspect_counts_equal_the_training_scan(data_uri, tmp_path):
    cfg = Config.from_options(data=data_uri, output=str(tmp_path / "run"),
                              cache_dir=str(tmp_path / "train-cache"),
                              work_dir=str(tmp_path / "work"), max_bad_fraction=0.25, threads=4)
    data = job._load_data(cfg, configfile.RunRecord(None, cfg))
    catalog, summary = data.catalog, data.summary

    result = CliRunner().invoke(cli, [
        "dataset", "inspect", "--json", "--max-bad-fraction", "0.25", "--threads", "4",
        "--cache-dir", str(tmp_path / "inspect-cache"), data_uri], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    assert {c["name"]: c["images"] for c in report["classes"]} == summary["class_counts"]
    assert report["skipped_files"] == summary["skipped_files"]  # same files, same reasons
    assert len(report["skipped_files"]) == 3
    assert report["totals"]["images"] == summary["images"] == len(catalog.samples)
    assert report["totals"]["converted_to_rgb"] == summary["converted_to_rgb"]
    assert report["image_stats"] == summary["image_stats"]
    assert report["image_stats"]["grayscale"] == 1 and report["image_stats"]["cmyk"] == 1
    assert report["background_left_out"] is True and report["verdict"] is None
    skipped_by_class = {c["name"]: c["skipped"] for c in report["classes"]}
    assert sum(skipped_by_class.values()) == 3


def test_inspect_table_and_exit_3_when_training_would_refuse(s3, bucket, class_folders,
                                                            tmp_path):
    upload_tree(s3, bucket, class_folders.parent, "datasets/caltech/")
    uri = f"s3://{bucket}/datasets/caltech/"
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "inspect", uri)
    assert heavy == []  # PIL yes; TensorFlow, Keras, matplotlib no
    assert rc == 3  # 3 bad files of 54 is over the default --max-bad-fraction 0.05
    [line] = [x for x in err.splitlines() if x.startswith("trainjob: error:")]
    assert "training would refuse" in line and "--max-bad-fraction" in line
    table = out.split("CLASS", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0].split() == ["IMAGES", "SKIPPED"]
    assert table[-1].split() == ["TOTAL", "51", "3"]
    assert "grayscale: 1, CMYK: 1" in out and "width 40-64 px" in out
    assert "truncated_0001.jpg" in out and "empty file" in out and "not an image" in out

    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "inspect",
                                            "--max-bad-fraction", "0.25", uri)
    assert rc == 0 and "training would accept this data" in out


@pytest.mark.parametrize("uri, code, words", [
    ("ftp://host/data.zip", 2, "unsupported URI scheme"),
    ("s3://{bucket}/datasets/missing.zip", 4, "does not exist"),
    ("s3://no-such-bucket-xyz/data/", 4, "no-such-bucket-xyz"),
])
def test_inspect_bad_input_is_one_line(s3, bucket, tmp_path, uri, code, words):
    rc, out, err, heavy = cli_in_subprocess(s3, tmp_path, "dataset", "inspect",
                                            uri.format(bucket=bucket))
    lines = [x for x in err.splitlines() if x.strip() and " INFO " not in x]
    assert rc == code and len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err and heavy == []


def test_inspect_a_local_folder(class_folders, tmp_path):
    result = CliRunner().invoke(cli, [
        "dataset", "inspect", "--max-bad-fraction", "0.25",
        "--cache-dir", str(tmp_path / "cache"), str(Path(class_folders).parent)])
    assert result.exit_code == 0, result.output
    assert "6 classes, 51 usable images, 3 skipped, of 54 files" in result.output
