"""``trainjob dataset pack`` into local folders, the plan, the re-encoding rule, the index,
``dataset inspect`` of a packed dataset, and the command's bad inputs."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_trainjob, start_trainjob, upload_tree
from helpers.jobs import hooks_file, wait_for
from helpers.packs import assert_shards_match_index, training_view
from PIL import Image

from trainjob.cli import main
from trainjob.config import Config
from trainjob.data import packed, packing
from trainjob.data.catalog import Dataset
from trainjob.data.shardwrite import encoded
from trainjob.errors import ConfigError
from trainjob.run.savepoints import fingerprint

SMALL = ["--max-bad-fraction", "0.25", "--processes", "2", "--threads", "4"]


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tfrecord"))}


def test_plan_ids_shards_and_the_samples_digest(official_zip, tmp_path):
    catalog, splits, expected = training_view(str(official_zip), tmp_path / "cache")
    val_bytes = sum(os.path.getsize(s.path) for s in splits.val)
    small = packing.plan(catalog, splits, shard_size=val_bytes // 3 + 1)
    # 6 val images in shards of a third of their bytes: 3 shards of 2
    assert [len(p.items) for p in small if p.split == "val"] == [2, 2, 2]
    train_bytes = sum(os.path.getsize(s.path) for s in splits.train)
    assert len([p for p in small if p.split == "train"]) == -(-train_bytes // (val_bytes // 3 + 1))
    plans = packing.plan(catalog, splits, shard_size=2**30)
    by_split = {name: [p for p in plans if p.split == name] for name in expected}
    # 39 training images, far below one shard's bytes: still 16 shards, equal counts
    assert len(by_split["train"]) == 16 and len(by_split["val"]) == len(by_split["test"]) == 1
    assert {len(p.items) for p in by_split["train"]} == {2, 3}
    for name, shards in [*by_split.items(), ("val", [p for p in small if p.split == "val"])]:
        assert [p.name for p in shards] == [f"{name}-{k:05d}.tfrecord" for k in range(len(shards))]
        items = [i for p in shards for i in p.items]
        assert [(i.id, i.label, i.key) for i in items] == \
            [(e[0], e[1], e[4]) for e in expected[name]]  # the split's order, dense ids
        assert [p.first for p in shards] == \
            [sum(len(q.items) for q in shards[:k]) for k in range(len(shards))]
    ids = sorted(i.id for p in plans for i in p.items)
    assert ids == list(range(len(catalog.samples)))
    cmyk = next(i for p in plans for i in p.items if i.key.endswith("cmyk_0001.jpg"))
    assert cmyk.key == "airplanes/cmyk_0001.jpg" and cmyk.path.endswith(".png")  # converted
    cfg = Config.from_options(data="x", output="y")  # seed 42, fractions 0.15: as above
    index = packing.describe(
        catalog, splits, packed.SplitSettings(42, 0.15, 0.15, None, False), 512, "x", "now", [])
    # What the index says of its images is what a run on the files records.
    assert index.samples == fingerprint(cfg, Dataset(catalog, splits, {}))["samples"]
    assert index.class_counts["train"] == Dataset(catalog, splits, {}).train_class_counts()


def photo(size: tuple[int, int], quality: int = 90, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    smooth = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * [1, 0.6, 0.3]
    pixels = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("size, max_side, reencoded", [
    ((1000, 700), 512, (512, 358)),  # far over: scaled to a long side of 512
    ((480, 640), 512, (384, 512)),  # exactly 1.25 x: still worth it
    ((630, 400), 512, None),  # under 1.25 x: the original bytes
    ((1000, 700), 0, None),  # --max-side 0: never
])
def test_images_are_reencoded_only_where_it_pays(tmp_path, size, max_side, reencoded):
    path = tmp_path / "a.jpg"
    path.write_bytes(photo(size))
    data, again = encoded(str(path), max_side)
    assert again == (reencoded is not None)
    if reencoded is None:
        assert data == path.read_bytes()
    else:
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.size) == ("JPEG", reencoded)
        assert len(data) < path.stat().st_size
        assert encoded(str(path), max_side) == (data, True)  # deterministic


def test_a_reencoding_larger_than_the_original_keeps_the_original(tmp_path):
    path = tmp_path / "stripes.png"  # identical rows: a tiny PNG, a large JPEG
    stripes = (np.arange(1400) // 3 % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(np.tile(stripes, (1000, 1))[..., None], 3, axis=2)).save(path)
    assert encoded(str(path), 512) == (path.read_bytes(), False)


@pytest.mark.e2e
def test_pack_a_prefix_and_the_zip_locally_byte_identical_then_rerun(
        seaweed, class_folders, official_zip, tmp_path):
    bucket = f"pack-{os.getpid()}"
    seaweed.client().create_bucket(Bucket=bucket)
    upload_tree(seaweed, bucket, class_folders, "data/101_ObjectCategories/")
    home = tmp_path / "home"
    first = run_trainjob(["dataset", "pack", f"s3://{bucket}/data/", str(tmp_path / "a"),
                          *SMALL], seaweed.env(TRAINJOB_SHARD_SIZE="64KiB"), home)
    assert first.returncode == 0, first.stderr
    assert f"train with --data {tmp_path / 'a'}/" in first.stdout
    second = run_trainjob(["dataset", "pack", str(official_zip), str(tmp_path / "b"), *SMALL],
                          seaweed.env(TRAINJOB_SHARD_SIZE="65536"), tmp_path / "home2")
    assert second.returncode == 0, second.stderr
    a, b = (json.loads((tmp_path / d / "index.json").read_text()) for d in "ab")
    assert_shards_match_index(tmp_path / "a", a)
    assert len(shard_files(tmp_path / "a")) == 18  # 16 train, 1 val, 1 test
    assert shard_files(tmp_path / "a") == shard_files(tmp_path / "b")
    assert a["source"] == f"s3://{bucket}/data/" and b["source"] == str(official_zip)
    assert {k: v for k, v in a.items() if k not in ("source", "created")} == \
        {k: v for k, v in b.items() if k not in ("source", "created")}
    assert [s["path"] for s in a["skipped"]] == ["accordion/truncated_0001.jpg",
                                                 "airplanes/empty_0001.jpg", "anchor/notes.txt"]
    assert a["image_stats"]["cmyk"] == 1 and a["max_side"] == 512

    before = (tmp_path / "a" / "index.json").read_bytes()
    written = (tmp_path / "a" / "index.json").stat()
    again = run_trainjob(["dataset", "pack", f"s3://{bucket}/data/", str(tmp_path / "a"),
                          *SMALL], seaweed.env(TRAINJOB_SHARD_SIZE="64KiB"), home)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("(already stored)") == 18 and "(stored)" not in again.stderr
    assert (tmp_path / "a" / "index.json").read_bytes() == before  # a finished pack: no-op
    now = (tmp_path / "a" / "index.json").stat()
    assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


def test_a_damaged_local_shard_is_packed_again_and_the_index_waits_for_it(class_folders,
                                                                          tmp_path):
    args = ["dataset", "pack", str(class_folders), str(tmp_path / "p"), *SMALL]
    assert run_trainjob(args, dict(os.environ), tmp_path / "home").returncode == 0
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    shard = tmp_path / "p" / "train-00003.tfrecord"
    good, stat = shard.read_bytes(), shard.stat()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one bit, same size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time
    go_on = tmp_path / "go-on"
    hooks = hooks_file(tmp_path, hold={"pack_stored:18": {"seconds": 120,
                                                          "until_file": str(go_on)}})
    log = tmp_path / "again.log"
    proc = start_trainjob(args, {**os.environ, "TRAINJOB_TEST_HOOKS": hooks},
                          tmp_path / "home", log)
    try:
        wait_for(lambda: "test hook: holding at pack_stored:18" in log.read_text(), proc, log,
                 120)
        assert shard.read_bytes() == good  # repaired, and meanwhile no index claims it
        assert not (tmp_path / "p" / "index.json").exists()
        go_on.touch()
        assert proc.wait(120) == 0, log.read_text()
    finally:
        proc.kill()
    out = log.read_text()
    assert "train-00003.tfrecord: 2 images" in out
    assert out.count("(stored)") == 1 and out.count("(already stored)") == 17
    assert json.loads((tmp_path / "p" / "index.json").read_text())["shards"] == index["shards"]


def test_inspect_describes_a_packed_dataset_from_its_index(class_folders, tmp_path):
    dest = tmp_path / "packed"
    assert run_trainjob(["dataset", "pack", str(class_folders), str(dest), *SMALL],
                        dict(os.environ), tmp_path / "home").returncode == 0
    home = tmp_path / "fresh"
    shown = run_trainjob(["dataset", "inspect", str(dest)], dict(os.environ), home)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "packed dataset (trainjob-packed version 1" in out
    assert "6 classes, 51 images in 18 shards" in out and "3 files skipped" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["train"], ["val"], ["test"])}
    assert [rows[s][1:3] for s in ("train", "val", "test")] == \
        [["39", "16"], ["6", "1"], ["6", "1"]]
    assert re.search(r"airplanes/empty_0001.jpg +empty file", out)
    assert "--seed 42 --val-fraction 0.15 --test-fraction 0.15" in out
    as_json = run_trainjob(["dataset", "inspect", str(dest), "--json"], dict(os.environ), home)
    report = json.loads(as_json.stdout)
    assert report["splits"]["train"]["shards"] == 16 and len(report["shards"]) == 18
    assert not (home / "cache" / "extracted").exists()  # nothing was scanned


def test_an_index_of_an_unknown_version_is_exit_2(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "index.json").write_text(json.dumps({"format": "trainjob-packed",
                                                           "version": 99}))
    assert main(["dataset", "inspect", str(tmp_path / "p")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"trainjob: error: {tmp_path / 'p' / 'index.json'}: ")
    assert "version 99" in line and "pack the data again" in line
    with pytest.raises(ConfigError, match="version 99"):
        packed.read_index(packed.packed_store(str(tmp_path / "p")))


def test_packed_store_costs_one_head(through_proxy, s3, bucket):
    proxy = through_proxy()
    s3.client().put_object(Bucket=bucket, Key="ds/index.json", Body=b"{}")
    assert packed.packed_store(f"s3://{bucket}/ds/").uri == f"s3://{bucket}/ds"
    assert packed.packed_store(f"s3://{bucket}/other/") is None
    assert packed.packed_store(f"s3://{bucket}/caltech-101.zip") is None
    assert proxy.requests == [("HEAD", f"/{bucket}/ds/index.json"),
                              ("HEAD", f"/{bucket}/other/index.json")]


@pytest.mark.parametrize("args, words", [
    (["/nonexistent/data", "{out}"], ["SRC /nonexistent/data: no such file or folder"]),
    (["{src}", "{out}", "--shard-size", "12XB"], ["--shard-size", "'12XB' is not a size"]),
    (["{src}", "{out}", "--max-side", "-1"], ["--max-side", "-1"]),
    (["{src}", "{out}", "--seed", "abc"], ["--seed", "'abc' is not a valid integer"]),
    (["{src}", "{out}", "--val-fraction", "0.6", "--test-fraction", "0.5"],
     ["--val-fraction + --test-fraction is 1.1"]),
    (["{src}", "{src}/packed"], ["is inside SRC"]),
    (["{src}", "{src}/accordion/image_0001.jpg"], ["is a file"]),
    (["{src}", "ftp://host/x"], ["unsupported URI scheme 'ftp://'"]),
])
def test_bad_inputs_fail_with_one_line_and_exit_2(class_folders, tmp_path, capsys, args,
                                                   words):
    argv = [a.format(src=class_folders, out=tmp_path / "out") for a in args]
    assert main(["dataset", "pack", *argv]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("trainjob: error: ")
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists()


def test_too_many_bad_files_is_exit_3_and_packs_nothing(class_folders, tmp_path, capsys):
    assert main(["dataset", "pack", str(class_folders), str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache"), "--max-bad-fraction", "0.01"]) == 3
    assert "--max-bad-fraction 0.01" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_bucket_is_exit_4(s3env, class_folders, tmp_path, capsys):
    assert main(["dataset", "pack", str(class_folders), "s3://no-such-bucket/p/",
                 "--cache-dir", str(tmp_path / "cache")]) == 4
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


def test_another_dataset_is_replaced_only_when_asked(class_folders, tmp_path, capsys):
    dest = tmp_path / "p"
    other = tmp_path / "other" / "101_ObjectCategories"
    shutil.copytree(class_folders, other)
    (other / "ant" / "image_0001.jpg").unlink()
    base = [str(dest), *SMALL, "--cache-dir", str(tmp_path / "cache")]
    assert main(["dataset", "pack", str(class_folders), *base]) == 0
    first = json.loads((dest / "index.json").read_text())
    capsys.readouterr()
    assert main(["dataset", "pack", str(class_folders), *base, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "give --replace to replace it" in err
    assert "skipped 3 of 54 files" not in err  # other settings: refused before the scan
    assert main(["dataset", "pack", str(other), *base]) == 2  # other images: after it
    assert "give --replace to replace it" in capsys.readouterr().err
    assert json.loads((dest / "index.json").read_text()) == first
    assert main(["dataset", "pack", str(other), *base, "--replace"]) == 0
    assert json.loads((dest / "index.json").read_text())["counts"]["train"] == 38


def test_an_index_of_another_version_at_dest_is_replaced_only_when_asked(class_folders,
                                                                         tmp_path, capsys):
    dest = tmp_path / "p"
    dest.mkdir()
    (dest / "index.json").write_text(json.dumps({"format": "trainjob-packed", "version": 99}))
    base = ["dataset", "pack", str(class_folders), str(dest), *SMALL, "--cache-dir",
            str(tmp_path / "cache")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "another format ('trainjob-packed' version 99): give --replace" in err
    assert "skipped 3 of 54 files" not in err  # before the scan
    assert main([*base, "--replace"]) == 0
    assert json.loads((dest / "index.json").read_text())["version"] == 1
