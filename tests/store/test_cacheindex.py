"""cacheindex.py: the merge of listing and index, the journal, the sweep after a kill.

The fetch-level behaviour over HTTP (changed, deleted, interrupted) is in test_storage.py.
"""

from __future__ import annotations

import json
import os

import pytest

from trainjob.store.cacheindex import PAGE, CacheIndex, OutOfOrder, intact, merge


def test_merge_pairs_listed_keys_with_the_index_and_finds_the_gone():
    listed = [("a", "e1", 1), ("b", "e2", 2), ("d", "e4", 4), ("f", "e6", 6)]
    indexed = [("a", "e1", 1, 10), ("b", "old", 2, 20), ("c", "e3", 3, 30),
               ("e", "e5", 5, 50), ("g", "e7", 7, 70)]
    gone: list[str] = []
    out = list(merge(listed, indexed, gone))
    assert out == [(("a", "e1", 1), ("e1", 1, 10)), (("b", "e2", 2), ("old", 2, 20)),
                   (("d", "e4", 4), None), (("f", "e6", 6), None)]
    assert gone == ["c", "e", "g"]


def test_merge_uses_s3_key_order_for_unicode_and_punctuation():
    # S3 lists in UTF-8 byte order; Python's str order is the same (code points).
    keys = sorted(["a/b", "a-b", "a.b", "a0", "ä", "z", "日本", "A", "a/é", "😀", "\uffff"],
                  key=lambda k: k.encode())
    assert keys == sorted(keys)
    gone: list[str] = []
    held = [h for _, h in merge([(k, "e", 1) for k in keys], [(k, "e", 1, 0) for k in keys],
                                gone)]
    assert held == [("e", 1, 0)] * len(keys) and gone == []


def test_merge_refuses_a_listing_out_of_order():
    with pytest.raises(OutOfOrder):
        list(merge([("b", "e", 1), ("a", "e", 1)], [], []))
    with pytest.raises(OutOfOrder):  # a repeated key too
        list(merge([("a", "e", 1), ("a", "e", 1)], [], []))


def test_rows_come_in_key_order_across_pages(tmp_path):
    with CacheIndex(tmp_path / "i.sqlite", tmp_path) as index:
        keys = [f"k{i:05d}" for i in range(PAGE * 2 + 7)]
        index.record([(k, "e", 1, 0) for k in reversed(keys)])
        index.settle()
        assert [r[0] for r in index.rows()] == keys


def test_journal_joins_the_index_only_when_settled_and_outlives_a_kill(tmp_path):
    path = tmp_path / "i.sqlite"
    with CacheIndex(path, tmp_path) as index:
        index.start_sync()
        index.record([("a", "e1", 1, 5)])
        assert list(index.rows()) == []  # the merge in progress never sees its own writes
        assert index.lookup("a") is None
        # no finish_sync: the process dies here
    with CacheIndex(path, tmp_path) as index:
        assert index.start_sync() is True  # dirty: the caller must sweep
        assert list(index.rows()) == [("a", "e1", 1, 5)]  # the complete download is kept
        index.finish_sync()
    with CacheIndex(path, tmp_path) as index:
        assert index.start_sync() is False


def test_a_file_replaced_or_touched_since_it_was_recorded_is_not_intact(tmp_path):
    path = tmp_path / "f.jpg"
    path.write_bytes(b"12345")
    st = os.stat(path)
    assert intact(path, 5, st.st_mtime_ns)
    assert not intact(path, 4, st.st_mtime_ns)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same size, other content
    assert not intact(path, 5, st.st_mtime_ns)
    assert not intact(tmp_path / "missing.jpg", 5, st.st_mtime_ns)


def test_sweep_keeps_only_files_the_index_vouches_for(tmp_path):
    root = tmp_path / "mirror"
    (root / "cls").mkdir(parents=True)
    files = {"cls/good.jpg": b"12345", "cls/short.jpg": b"12", "cls/touched.jpg": b"abc",
             "cls/.good.jpg.99-1.part": b"123",  # a killed download's temporary
             "stray.jpg": b"x"}  # renamed in place, never recorded
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    mtime = {rel: os.stat(root / rel).st_mtime_ns for rel in files}
    with CacheIndex(tmp_path / "i.sqlite", root) as index:
        assert index.start_sync() is True  # a fresh index always sweeps first
        index.record([("cls/good.jpg", "e", 5, mtime["cls/good.jpg"]),
                      ("cls/short.jpg", "e", 5, mtime["cls/short.jpg"]),  # recorded: 5 bytes
                      ("cls/touched.jpg", "e", 3, mtime["cls/touched.jpg"] - 1)])
        index.settle()
        assert index.sweep() == 4
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) \
        == ["cls/good.jpg"]


def test_forget_drops_rows(tmp_path):
    with CacheIndex(tmp_path / "i.sqlite", tmp_path) as index:
        index.record([("a", "e", 1, 0), ("b", "e", 2, 0)])
        index.settle()
        index.forget(["a"])
        assert list(index.rows()) == [("b", "e", 2, 0)]


def test_an_index_of_another_schema_version_is_rebuilt(tmp_path):
    path = tmp_path / "i.sqlite"
    with CacheIndex(path, tmp_path) as index:
        index.record([("a", "e", 1, 0)])
        index.settle()
        index.finish_sync()
        index.db.execute("PRAGMA user_version = 0")
    with CacheIndex(path, tmp_path) as index:
        assert list(index.rows()) == []
        assert index.start_sync() is True


def test_the_previous_json_index_is_imported_once(tmp_path):
    cache = tmp_path / "cache"
    root = cache / "s3" / "bkt" / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "1.jpg").write_bytes(b"x" * 10)
    (root / "a" / "2.jpg").write_bytes(b"x" * 7)  # not the size the old index recorded
    with CacheIndex.for_prefix(cache, "bkt", "data/") as index:
        path = next((cache / "index").glob("*.sqlite"))
    path.unlink()
    legacy = path.with_suffix(".json")
    legacy.write_text(json.dumps({"a/1.jpg": ["e1", 10], "a/2.jpg": ["e2", 20],
                                  "b/3.jpg": ["e3", 30]}))  # b/3.jpg: never on disk
    with CacheIndex.for_prefix(cache, "bkt", "data/") as index:
        mtime = os.stat(root / "a" / "1.jpg").st_mtime_ns
        assert list(index.rows()) == [("a/1.jpg", "e1", 10, mtime)]
    assert not legacy.exists()
