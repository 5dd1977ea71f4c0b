"""The packed format's bytes: framing and Example written without TensorFlow are exactly what
TensorFlow's own writer produces, and TensorFlow reads them back."""

from __future__ import annotations

import os
import random

import pytest
import tensorflow as tf

from trainjob.data import packfmt

# (id, label, split, image, key): empty and large images, big ids, non-ASCII keys.
SAMPLES = [(0, 0, "train", b"", "accordion/image_0001.jpg"),
           (1, 3, "val", os.urandom(300), "ant/é 漢.png"),
           (2**40 + 7, 101, "test", os.urandom(70_000), "x/" + "k" * 200)] + \
          [(i, i % 7, ("train", "val", "test")[i % 3], os.urandom(random.Random(i).randrange(5000)),
            f"class_{i % 7}/img_{i}.jpg") for i in range(3, 60)]


def tf_record(sample_id: int, label: int, split: str, image: bytes, key: str) -> bytes:
    """What tf.train.Example serializes deterministically for the same sample."""
    feature = {
        "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[sample_id])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "split": tf.train.Feature(int64_list=tf.train.Int64List(
            value=[{"train": 0, "val": 1, "test": 2}[split]])),
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True)


def write_with_tf(path, samples) -> bytes:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for s in samples:
            writer.write(tf_record(*s))
    return path.read_bytes()


def test_crc32c_is_castagnolis():
    assert packfmt.crc32c_python(b"123456789") == 0xE3069283  # the standard check value
    data = os.urandom(100_000)
    assert packfmt.crc32c(data) == packfmt.crc32c_python(data)
    assert packfmt.google_crc32c is not None  # the C implementation serves the real packs


@pytest.mark.parametrize("crc", ["c", "python"])
def test_records_are_byte_identical_to_tensorflows_writer(tmp_path, monkeypatch, crc):
    if crc == "python":
        monkeypatch.setattr(packfmt, "google_crc32c", None)
    mine = b"".join(packfmt.sample_record(*s) for s in SAMPLES)
    assert mine == write_with_tf(tmp_path / "tf.tfrecord", SAMPLES)


def test_tensorflow_reads_and_parses_every_record(tmp_path):
    path = tmp_path / "shard.tfrecord"
    path.write_bytes(b"".join(packfmt.sample_record(*s) for s in SAMPLES))
    spec = {"id": tf.io.FixedLenFeature([], tf.int64),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "split": tf.io.FixedLenFeature([], tf.int64),
            "image": tf.io.FixedLenFeature([], tf.string),
            "key": tf.io.FixedLenFeature([], tf.string)}
    got = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(path))]
    assert [(int(g["id"]), int(g["label"]), int(g["split"]), g["image"].numpy(),
             g["key"].numpy().decode()) for g in got] == \
        [(i, label, {"train": 0, "val": 1, "test": 2}[split], image, key)
         for i, label, split, image, key in SAMPLES]


def test_records_and_parse_example_read_what_tensorflow_wrote(tmp_path):
    data = write_with_tf(tmp_path / "tf.tfrecord", SAMPLES)
    parsed = [packfmt.parse_example(r) for r in packfmt.records(data)]
    assert [(p["id"], p["label"], p["image"], p["key"].decode()) for p in parsed] == \
        [(i, label, image, key) for i, label, _, image, key in SAMPLES]
    assert packfmt.parse_example(packfmt.example({"n": -5}))["n"] == -5


@pytest.mark.parametrize("where", [3, 9, 20, -2])
def test_a_damaged_or_cut_record_is_found(where):
    data = bytearray(b"".join(packfmt.sample_record(*s) for s in SAMPLES[:3]))
    data[where] ^= 0x40
    with pytest.raises(ValueError, match="crc at byte"):
        list(packfmt.records(bytes(data)))
    whole = b"".join(packfmt.sample_record(*s) for s in SAMPLES[:3])
    with pytest.raises(ValueError, match="truncated"):
        list(packfmt.records(whole[:-1]))
