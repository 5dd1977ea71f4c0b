"""The packed format's bytes, written without TensorFlow: TFRecord framing around one
hand-encoded ``tf.train.Example`` per sample, byte for byte what ``tf.io.TFRecordWriter``
writes for ``Example.SerializeToString(deterministic=True)`` (tests/data/test_packfmt.py
compares them), so ``tf.data.TFRecordDataset`` and ``tf.io.parse_example`` read it.

A record:  uint64 length (little-endian) | uint32 masked crc32c of those 8 bytes | data |
           uint32 masked crc32c of data;  masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.

The Example (tensorflow/core/example/{example,feature}.proto):
  Example  { Features features = 1; }     Features { map<string, Feature> feature = 1; }
  Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                     Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }  Int64List { repeated int64 value = 1 [packed]; }
A map is a repeated entry message (key = 1, value = 2); deterministic serialization writes
the entries in key order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

try:  # Google's C implementation (~25 GB/s): what 128 MB shards need
    import google_crc32c
except ImportError:  # pragma: no cover - a dependency; the fallback serves the format's tests
    google_crc32c = None

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
FEATURES = {"id": "int64", "label": "int64", "split": "int64", "image": "bytes",
            "key": "bytes"}

_POLY = 0x82F63B78  # Castagnoli, reflected
_MASK_DELTA = 0xA282EAD8
HEADER = 12  # the length and its crc
FOOTER = 4  # the data's crc


def _table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _table()


def crc32c_python(data: bytes) -> int:
    """crc32c, byte by byte (~10 MB/s): the reference the C implementation is checked
    against, and the fallback where google-crc32c is missing."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    if google_crc32c is None:  # pragma: no cover
        return crc32c_python(data)
    return google_crc32c.value(data)


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord record holding ``data``."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc(length)), data,
                     struct.pack("<I", masked_crc(data))))


def records(buf: bytes) -> Iterator[bytes]:
    """The data of every record of a TFRecord file's bytes, both crcs checked; ValueError
    names the offset of a damaged or truncated record."""
    pos = 0
    while pos < len(buf):
        if pos + HEADER > len(buf):
            raise ValueError(f"truncated record header at byte {pos}")
        length = buf[pos:pos + 8]
        (n,) = struct.unpack("<Q", length)
        if struct.unpack_from("<I", buf, pos + 8)[0] != masked_crc(length):
            raise ValueError(f"bad length crc at byte {pos}")
        end = pos + HEADER + n
        if end + FOOTER > len(buf):
            raise ValueError(f"truncated record at byte {pos}")
        data = buf[pos + HEADER:end]
        if struct.unpack_from("<I", buf, end)[0] != masked_crc(data):
            raise ValueError(f"bad data crc at byte {pos}")
        yield data
        pos = end + FOOTER


# --- the Example, by hand ---------------------------------------------------------------

def _varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64  # an int64 below zero: ten bytes of two's complement
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _field(3, _field(1, _varint(value)))  # int64_list, packed
    return _field(1, _field(1, value))  # bytes_list


def example(features: dict[str, int | bytes]) -> bytes:
    """A serialized tf.train.Example of one int64 or bytes value per feature."""
    entries = b"".join(_field(1, _field(1, name.encode()) + _field(2, _feature(features[name])))
                       for name in sorted(features))
    return _field(1, entries)


def sample_record(sample_id: int, label: int, split: str, image: bytes, key: str) -> bytes:
    """One packed sample as a framed record: its stable id, label, split code (0 train,
    1 val, 2 test), the encoded image file and its "class/file name"."""
    return frame(example({"id": sample_id, "label": label, "split": SPLIT_CODES[split],
                          "image": image, "key": key.encode()}))


def parse_example(data: bytes) -> dict[str, int | bytes]:
    """The features of an Example this module wrote (one int64 or bytes value each), read
    without protobuf: for tests and tools that check a shard without TensorFlow."""
    (_, features), = _fields(data)
    out: dict[str, int | bytes] = {}
    for _, entry in _fields(features):
        parts = dict(_fields(entry))
        (kind, values), = _fields(parts[2])
        (_, value), = _fields(values)
        if kind == 3:
            number, _ = _read_varint(value, 0)
            out[parts[1].decode()] = number - (1 << 64) if number >= 1 << 63 else number
        else:
            out[parts[1].decode()] = bytes(value)
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        if tag & 7 != 2:
            raise ValueError(f"unexpected wire type {tag & 7} in a packed Example")
        n, pos = _read_varint(buf, pos)
        yield tag >> 3, buf[pos:pos + n]
        pos += n
