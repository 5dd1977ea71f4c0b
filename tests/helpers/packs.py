"""Packed datasets read back with TensorFlow, and what the training scan says they must hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trainjob.data.catalog import Catalog, Splits, split
from trainjob.data.source import load_catalog

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# index.json's keys, as the streaming reader is written against them (issue #20).
INDEX_KEYS = ["format", "version", "classes", "split", "counts", "samples", "max_side",
              "source", "created", "skipped", "image_stats", "class_counts", "shards"]
SHARD_KEYS = ["name", "split", "count", "bytes", "sha256", "first"]


def read_records(folder: Path, index: dict) -> dict[str, list[tuple]]:
    """Every record of every shard the index lists, per split in the index's order, as
    (id, label, split code, image bytes, key): TFRecordDataset + parse_single_example."""
    import tensorflow as tf

    spec = {"id": tf.io.FixedLenFeature([], tf.int64),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "split": tf.io.FixedLenFeature([], tf.int64),
            "image": tf.io.FixedLenFeature([], tf.string),
            "key": tf.io.FixedLenFeature([], tf.string)}
    out: dict[str, list[tuple]] = {s: [] for s in SPLIT_CODES}
    for shard in index["shards"]:
        for record in tf.data.TFRecordDataset(str(folder / shard["name"])):
            f = tf.io.parse_single_example(record, spec)
            out[shard["split"]].append((int(f["id"]), int(f["label"]), int(f["split"]),
                                        f["image"].numpy(), f["key"].numpy().decode()))
    return out


def training_view(uri: str, cache: Path, seed: int = 42, val_fraction: float = 0.15,
                  test_fraction: float = 0.15) -> tuple[Catalog, Splits, dict[str, list[tuple]]]:
    """What training makes of the dataset at ``uri`` (``source.load_catalog`` with a cache
    laid out as the job's, ``catalog.split``), and the records a pack of it must hold per
    split, in the split's order: ids dense in (class, file path) order, the file training
    decodes, "class/file name" of the original."""
    catalog, _ = load_catalog(uri, cache, include_background=False, max_extract_bytes=2**30,
                              max_bad_fraction=0.25, threads=4, scan_threads=2)
    splits = split(catalog, val_fraction=val_fraction, test_fraction=test_fraction,
                   train_per_class=None, seed=seed)

    def key(s) -> str:
        return Path(s.origin or s.path).relative_to(catalog.root).as_posix()

    ordered = sorted(catalog.samples, key=lambda s: (catalog.classes[s.label], key(s)))
    ids = {key(s): i for i, s in enumerate(ordered)}
    expected = {name: [(ids[key(s)], s.label, code, Path(s.path).read_bytes(), key(s))
                       for s in getattr(splits, name)]
                for name, code in SPLIT_CODES.items()}
    return catalog, splits, expected


def download(server, bucket: str, prefix: str, dest: Path) -> dict:
    """The packed dataset under ``prefix`` into ``dest``; its index."""
    dest.mkdir(parents=True, exist_ok=True)
    for key in server.keys(bucket, prefix + "/"):
        target = dest / key[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(server.read(bucket, key))
    return json.loads((dest / "index.json").read_text())


def assert_shards_match_index(folder: Path, index: dict) -> None:
    """The index has the agreed keys; each shard its size and sha256, and each split's
    shards equal counts (+-1) that follow each other (``first``)."""
    assert list(index) == INDEX_KEYS
    assert (index["format"], index["version"]) == ("trainjob-packed", 1)
    for name in SPLIT_CODES:
        shards = [s for s in index["shards"] if s["split"] == name]
        counts = [s["count"] for s in shards]
        assert max(counts) - min(counts) <= 1, (name, counts)
        assert [s["first"] for s in shards] == [sum(counts[:i]) for i in range(len(counts))]
        assert sum(counts) == index["counts"][name]
    for shard in index["shards"]:
        assert list(shard) == SHARD_KEYS
        data = (folder / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"], shard["name"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"], shard["name"]
