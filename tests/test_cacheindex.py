"""cacheindex.py: the merge of listing and index, the journal, the sweep after a kill.

The fetch-level behaviour over HTTP (changed, deleted, interrupted) is in test_storage.py.
"""

from __future__ import annotations

import json

import pytest

from trainjob.cacheindex import PAGE, CacheIndex, OutOfOrder, merge


def test_merge_pairs_listed_keys_with_the_index_and_finds_the_gone():
    listed = [("a", "e1", 1), ("b", "e2", 2), ("d", "e4", 4), ("f", "e6", 6)]
    indexed = [("a", "e1", 1), ("b", "old", 2), ("c", "e3", 3), ("e", "e5", 5),
               ("g", "e7", 7)]
    gone: list[str] = []
    out = list(merge(listed, indexed, gone))
    assert out == [(("a", "e1", 1), ("e1", 1)), (("b", "e2", 2), ("old", 2)),
                   (("d", "e4", 4), None), (("f", "e6", 6), None)]
    assert gone == ["c", "e", "g"]


def test_merge_uses_s3_key_order_for_unicode_and_punctuation():
    # S3 lists in UTF-8 byte order; Python's str order is the same (code points).
    keys = sorted(["a/b", "a-b", "a.b", "a0", "ä", "z", "日本", "A", "a/é"],
                  key=lambda k: k.encode())
    assert keys == sorted(keys)
    rows = [(k, "e", 1) for k in keys]
    gone: list[str] = []
    assert [held for _, held in merge(rows, rows, gone)] == [("e", 1)] * len(keys)
    assert gone == []


def test_merge_refuses_a_listing_out_of_order():
    with pytest.raises(OutOfOrder):
        list(merge([("b", "e", 1), ("a", "e", 1)], [], []))
    with pytest.raises(OutOfOrder):  # a repeated key too
        list(merge([("a", "e", 1), ("a", "e", 1)], [], []))


def test_rows_come_in_key_order_across_pages(tmp_path):
    with CacheIndex(tmp_path / "i.sqlite") as index:
        keys = [f"k{i:05d}" for i in range(PAGE * 2 + 7)]
        index.record([(k, "e", 1) for k in reversed(keys)])
        index.settle()
        assert [r[0] for r in index.rows()] == keys


def test_journal_joins_the_index_only_when_settled_and_outlives_a_kill(tmp_path):
    path = tmp_path / "i.sqlite"
    with CacheIndex(path) as index:
        index.start_sync()
        index.record([("a", "e1", 1)])
        assert list(index.rows()) == []  # the merge in progress never sees its own writes
        assert index.lookup("a") is None
        # no finish_sync: the process dies here
    with CacheIndex(path) as index:
        assert index.start_sync() is True  # dirty: the caller must sweep
        assert list(index.rows()) == [("a", "e1", 1)]  # the complete download is kept
        index.finish_sync()
    with CacheIndex(path) as index:
        assert index.start_sync() is False


def test_sweep_keeps_only_files_the_index_vouches_for(tmp_path):
    root = tmp_path / "mirror"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "good.jpg").write_bytes(b"12345")
    (root / "cls" / "short.jpg").write_bytes(b"12")  # recorded as 5 bytes: truncated
    (root / "cls" / ".good.jpg.99-1.part").write_bytes(b"123")  # a killed download
    (root / "stray.jpg").write_bytes(b"x")  # renamed in place, never recorded
    with CacheIndex(tmp_path / "i.sqlite") as index:
        assert index.start_sync() is True  # a fresh index always sweeps first
        index.record([("cls/good.jpg", "e", 5), ("cls/short.jpg", "e", 5)])
        index.settle()
        assert index.sweep(root) == 3
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) \
        == ["cls/good.jpg"]


def test_forget_drops_rows(tmp_path):
    with CacheIndex(tmp_path / "i.sqlite") as index:
        index.record([("a", "e", 1), ("b", "e", 2)])
        index.settle()
        index.forget(["a"])
        assert list(index.rows()) == [("b", "e", 2)]


def test_the_previous_json_index_is_imported_once(tmp_path):
    index_dir = tmp_path / "cache" / "index"
    index_dir.mkdir(parents=True)
    probe = CacheIndex.for_prefix(tmp_path / "cache", "bkt", "data/")
    probe.db.close()
    sqlite_path = next(index_dir.glob("*.sqlite"))
    sqlite_path.unlink()
    legacy = sqlite_path.with_suffix(".json")
    legacy.write_text(json.dumps({"a/1.jpg": ["e1", 10], "b/2.jpg": ["e2", 20]}))
    with CacheIndex.for_prefix(tmp_path / "cache", "bkt", "data/") as index:
        assert list(index.rows()) == [("a/1.jpg", "e1", 10), ("b/2.jpg", "e2", 20)]
    assert not legacy.exists()
