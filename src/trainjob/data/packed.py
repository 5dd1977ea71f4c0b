"""A packed dataset's index: ``index.json`` beside the shards, the one file that says what
the dataset is, and written last, so a prefix holding it is a finished pack.

    {"format": "trainjob-packed", "version": 1,
     "classes": [...], "split": {"seed", "val_fraction", "test_fraction", "train_per_class",
     "include_background"}, "counts": {"train", "val", "test"},
     "samples": "<digest(all):digest(train)>", "class_counts": {"train": [per class], ...},
     "max_side": 512, "source": "<SRC, redacted>",
     "created": "<UTC>", "skipped": [{"path", "reason"}], "image_stats": {...},
     "shards": [{"name", "split", "count", "bytes", "sha256", "first"}, ...]}

``first`` is the position of a shard's first sample in its split's order (the seeded
order of ``catalog.split``); a split's shards follow each other in the list. ``samples`` is
the digest ``run.savepoints.fingerprint`` computes for the same images, so a run on the
packed data and a run on the original agree on what they train on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from trainjob.errors import ConfigError, DataError
from trainjob.store.base import Store
from trainjob.store.fetch import ARCHIVE_SUFFIXES
from trainjob.store.uri import open_store

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "trainjob-packed"
VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the dataset's prefix
    split: str
    count: int
    bytes: int
    sha256: str
    first: int  # position of its first sample in the split


@dataclass(frozen=True)
class SplitSettings:
    """What decided the split, fixed at pack time."""

    seed: int
    val_fraction: float
    test_fraction: float
    train_per_class: int | None
    include_background: bool


@dataclass(frozen=True)
class PackedIndex:
    classes: list[str]
    split: SplitSettings
    counts: dict[str, int]
    samples: str
    max_side: int
    source: str
    created: str
    shards: list[Shard]
    skipped: list[dict[str, str]] = field(default_factory=list)
    image_stats: dict[str, Any] = field(default_factory=dict)
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # per split, class order

    def split_shards(self, split: str) -> list[Shard]:
        """The shards of ``split``, in the split's order."""
        return [s for s in self.shards if s.split == split]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "classes": self.classes,
                "split": dataclasses.asdict(self.split), "counts": self.counts,
                "samples": self.samples, "max_side": self.max_side, "source": self.source,
                "created": self.created, "skipped": self.skipped,
                "image_stats": self.image_stats, "class_counts": self.class_counts,
                "shards": [dataclasses.asdict(s) for s in self.shards]}

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = INDEX) -> PackedIndex:
        """The index ``d`` (already checked to be this format and version); DataError, naming
        ``where``, when a field is missing or has the wrong type."""
        try:
            index = cls(classes=[str(c) for c in d["classes"]],
                        split=SplitSettings(**d["split"]),
                        counts={s: int(d["counts"][s]) for s in SPLITS},
                        samples=str(d["samples"]), max_side=int(d["max_side"]),
                        source=str(d["source"]), created=str(d["created"]),
                        shards=[Shard(**s) for s in d["shards"]],
                        skipped=list(d["skipped"]), image_stats=dict(d["image_stats"]),
                        class_counts={s: [int(n) for n in d["class_counts"][s]]
                                      for s in SPLITS})
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: damaged packed index ({type(exc).__name__}: {exc}); "
                            "pack the dataset again") from exc
        for split in SPLITS:
            if sum(s.count for s in index.split_shards(split)) != index.counts[split] or \
                    sum(index.class_counts[split]) != index.counts[split] or \
                    len(index.class_counts[split]) != len(index.classes):
                raise DataError(f"{where}: damaged packed index (the {split} shards or "
                                f"classes do not add up to its count {index.counts[split]}); "
                                "pack the dataset again")
        return index


def check_format(d: object, where: str) -> None:
    """ConfigError (exit 2) unless ``d`` is an index of the format and version this
    trainjob reads."""
    fmt = d.get("format") if isinstance(d, dict) else None
    version = d.get("version") if isinstance(d, dict) else None
    if fmt != FORMAT or version != VERSION:
        raise ConfigError(f"{where}: packed format {fmt!r} version {version!r} is not one "
                          f"this trainjob reads ({FORMAT!r} version {VERSION}): pack the data "
                          "again with this trainjob (trainjob dataset pack), or use the "
                          "trainjob version that packed it")


def read_index(store: Store) -> PackedIndex:
    """The index of the packed dataset in ``store``: ConfigError (exit 2) for none, or an
    unknown format or version; DataError (exit 3) for a damaged one."""
    where = store.child(INDEX)
    data = store.read_bytes(INDEX)
    if data is None:
        raise ConfigError(f"{where} does not exist: not a packed dataset (or its packing "
                          "has not finished: run trainjob dataset pack again)")
    try:
        d = json.loads(data)
    except ValueError as exc:
        raise DataError(f"{where}: damaged packed index (not JSON: {exc}); pack the "
                        "dataset again") from exc
    check_format(d, where)
    return PackedIndex.from_dict(d, where)


def packed_store(uri: str, threads: int = 16) -> Store | None:
    """The store of the packed dataset at ``uri`` when it is a prefix (or folder) holding
    index.json, else None. Cheap: one HEAD (a stat locally), no listing; an archive's URI
    costs nothing."""
    if uri.rstrip("/").lower().endswith(ARCHIVE_SUFFIXES):
        return None
    store = open_store(uri.rstrip("/") or uri, threads)
    return store if store.exists(INDEX) else None
