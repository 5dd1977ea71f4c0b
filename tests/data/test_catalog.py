"""trainjob.data.catalog: safe extraction, the official layout, image checks, splits."""

from __future__ import annotations

import io
import random
import stat
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sampledata
from PIL import Image

from trainjob.data import archives
from trainjob.data.archives import unpack
from trainjob.data.catalog import BACKGROUND, Catalog, Sample, _split_sizes, locate, scan, split
from trainjob.errors import DataError

GB = 10**9


# --- helpers ------------------------------------------------------------------------------

def jpeg_bytes(label: int = 0, index: int = 0) -> bytes:
    buf = io.BytesIO()
    sampledata.image_for(label, index, (24, 24)).save(buf, "JPEG")
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def good_members(tar: tarfile.TarFile) -> None:
    for cls in ("cats", "dogs"):
        for i in range(2):
            add_bytes(tar, f"data/{cls}/image_{i}.jpg", jpeg_bytes(i))


def make_tar(path: Path, build, mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        build(tar)
    return path


@pytest.fixture
def area(tmp_path):
    """src/ holds the archives; work/extract is the extraction root; work/ must stay clean."""
    (tmp_path / "src").mkdir()
    (tmp_path / "work" / "extract").mkdir(parents=True)
    return tmp_path


def assert_nothing_outside(area: Path) -> None:
    """Nothing was written outside the per-archive extraction folder."""
    extract_root = area / "work" / "extract"
    assert sorted(p.name for p in (area / "work").iterdir()) == ["extract"]
    for entry in extract_root.iterdir():
        assert entry.is_dir() and not entry.is_symlink(), entry
    assert sorted(p.name for p in area.iterdir()) == ["src", "work"]
    for path in area.rglob("*"):
        assert "evil" not in path.name or path.is_relative_to(area / "src"), path
    for path in extract_root.rglob("*"):
        assert not path.is_symlink() or \
            path.resolve().is_relative_to(extract_root.resolve()), path


def assert_unsafe(archive: Path, area: Path, *words: str) -> DataError:
    with pytest.raises(DataError) as err:
        unpack(archive, area / "work" / "extract", GB)
    assert err.value.exit_code == 3
    message = str(err.value)
    assert "\n" not in message and archive.name in message
    for word in words:
        assert word in message, message
    assert_nothing_outside(area)
    return err.value


# --- unsafe archives ------------------------------------------------------------------------

def test_tar_with_dotdot_member(area):
    def build(tar):
        good_members(tar)
        add_bytes(tar, "data/../../../evil.txt", b"pwned")
        add_bytes(tar, "../evil2.txt", b"pwned")
    assert_unsafe(make_tar(area / "src" / "slip.tar", build), area, "outside")


def test_tgz_with_dotdot_member(area):
    def build(tar):
        add_bytes(tar, "../../evil.txt", b"pwned")
        good_members(tar)
    assert_unsafe(make_tar(area / "src" / "slip.tar.gz", build, "w:gz"), area)


def test_tar_with_absolute_member(area):
    target = area / "evil_abs.txt"
    def build(tar):
        good_members(tar)
        add_bytes(tar, str(target), b"pwned")
    assert_unsafe(make_tar(area / "src" / "abs.tar", build), area, "outside")
    assert not target.exists()


def test_tar_with_symlink_pointing_outside(area):
    outside = area / "evil_target"
    outside.mkdir()
    def build(tar):
        good_members(tar)
        add_special(tar, "data/link", tarfile.SYMTYPE, "../../../../evil_target")
        add_bytes(tar, "data/link/evil.txt", b"written through the link")
    with pytest.raises(DataError) as err:
        unpack(make_tar(area / "src" / "link.tar", build), area / "work" / "extract", GB)
    assert err.value.exit_code == 3 and "link" in str(err.value)
    assert list(outside.iterdir()) == []
    outside.rmdir()
    assert_nothing_outside(area)


def test_tar_with_absolute_symlink(area):
    def build(tar):
        good_members(tar)
        add_special(tar, "data/passwd", tarfile.SYMTYPE, "/etc/passwd")
    assert_unsafe(make_tar(area / "src" / "abslink.tar", build), area, "link")


def test_tar_with_hardlink_outside(area):
    def build(tar):
        good_members(tar)
        add_special(tar, "data/hard", tarfile.LNKTYPE, "../../../etc/passwd")
    assert_unsafe(make_tar(area / "src" / "hard.tar", build), area)


def test_tar_with_absolute_hardlink(area):
    def build(tar):
        good_members(tar)
        add_special(tar, "data/hard", tarfile.LNKTYPE, "/etc/passwd")
    assert_unsafe(make_tar(area / "src" / "hardabs.tar", build), area)


@pytest.mark.parametrize("kind, name", [(tarfile.CHRTYPE, "null"), (tarfile.BLKTYPE, "sda"),
                                        (tarfile.FIFOTYPE, "fifo")])
def test_tar_with_device_or_fifo(area, kind, name):
    def build(tar):
        good_members(tar)
        add_special(tar, f"data/{name}", kind)
    assert_unsafe(make_tar(area / "src" / f"{name}.tar", build), area, "device or fifo")


def test_zip_with_dotdot_member(area):
    archive = area / "src" / "slip.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/cats/image_0.jpg", jpeg_bytes())
        zf.writestr("../../evil.txt", b"pwned")
    assert_unsafe(archive, area, "outside")


def test_zip_with_absolute_member(area):
    archive = area / "src" / "abs.zip"
    target = area / "evil_abs_zip.txt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/cats/image_0.jpg", jpeg_bytes())
        zf.writestr(str(target), b"pwned")
    assert_unsafe(archive, area)
    assert not target.exists()


def test_zip_with_symlink_pointing_outside(area):
    archive = area / "src" / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/cats/image_0.jpg", jpeg_bytes())
        info = zipfile.ZipInfo("data/cats/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../../etc")
    assert_unsafe(archive, area, "link")


def test_safe_symlink_inside_the_archive_is_allowed(area):
    def build(tar):
        good_members(tar)
        add_special(tar, "data/cats/alias.jpg", tarfile.SYMTYPE, "image_0.jpg")
    roots = unpack(make_tar(area / "src" / "ok.tar", build), area / "work" / "extract", GB)
    assert locate(roots).name == "data"
    assert_nothing_outside(area)


def test_chained_symlinks_that_escape_together(area):
    """Each link looks harmless while nothing is on disk; together they lead outside."""
    def build(tar):
        good_members(tar)
        add_special(tar, "data/l1", tarfile.SYMTYPE, "cats/..")
        add_special(tar, "data/cats/l2", tarfile.SYMTYPE, "../l1/../..")
        add_bytes(tar, "data/cats/l2/evil.txt", b"pwned")
    with pytest.raises(DataError) as err:
        unpack(make_tar(area / "src" / "chain.tar", build), area / "work" / "extract", GB)
    assert err.value.exit_code == 3
    assert_nothing_outside(area)


def test_tar_made_with_dot_prefix_and_internal_hardlink(area):
    def build(tar):
        info = tarfile.TarInfo(".")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for cls in ("cats", "dogs"):
            for i in range(2):
                add_bytes(tar, f"./data/{cls}/image_{i}.jpg", jpeg_bytes(i))
        add_special(tar, "./data/dogs/same_as_cat.jpg", tarfile.LNKTYPE, "./data/cats/image_0.jpg")
    roots = unpack(make_tar(area / "src" / "dot.tar", build), area / "work" / "extract", GB)
    root = locate(roots)
    assert root.name == "data"
    cat = (root / "cats" / "image_0.jpg").read_bytes()
    assert (root / "dogs" / "same_as_cat.jpg").read_bytes() == cat
    assert_nothing_outside(area)


def test_nested_unsafe_archive_is_refused(area):
    inner = make_tar(area / "src" / "inner.tar", lambda tar: add_bytes(tar, "../../../../evil.txt",
                                                                       b"x"))
    outer = area / "src" / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "dataset/inner.tar")
    inner.unlink()
    with pytest.raises(DataError) as err:
        unpack(outer, area / "work" / "extract", GB)
    assert "inner.tar" in str(err.value) and err.value.exit_code == 3
    assert_nothing_outside(area)


# --- size cap -----------------------------------------------------------------------------------

def test_max_extract_bytes_tar(area):
    archive = make_tar(area / "src" / "big.tar.gz",
                       lambda tar: add_bytes(tar, "data/a/big.bin", b"\0" * 200_000), "w:gz")
    assert archive.stat().st_size < 10_000  # compresses well: a little bomb
    with pytest.raises(DataError) as err:
        unpack(archive, area / "work" / "extract", 100_000)
    assert "--max-extract-bytes" in str(err.value) and err.value.exit_code == 3
    assert not list((area / "work" / "extract").rglob("big.bin"))
    assert unpack(archive, area / "work" / "extract", 300_000)  # under the cap: fine


def test_max_extract_bytes_zip(area):
    archive = area / "src" / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"data/a/big{i}.bin", b"\0" * 50_000)
    with pytest.raises(DataError, match="--max-extract-bytes"):
        unpack(archive, area / "work" / "extract", 120_000)


def test_max_extract_bytes_counts_nested_archives(area, official_zip):
    total = 0
    with zipfile.ZipFile(official_zip) as zf:
        total = sum(i.file_size for i in zf.infolist())
    # The outer zip alone fits; with the nested tar.gz unpacked it does not.
    with pytest.raises(DataError, match="--max-extract-bytes"):
        unpack(official_zip, area / "work" / "extract", total + 1000)


# --- the official layout ---------------------------------------------------------------------

def test_official_nested_zip_is_found(tmp_path, official_zip):
    roots = unpack(official_zip, tmp_path / "extract", GB)
    class_root = locate(roots)
    assert class_root.name == "101_ObjectCategories"
    assert (class_root / "accordion").is_dir()
    assert (class_root / BACKGROUND).is_dir()
    everything = [p for r in roots for p in r.rglob("*")]
    assert not [p for p in everything if "__MACOSX" in p.parts or p.name.startswith("._")]
    assert any(p.name == "annotation_0001.mat" for p in everything)  # Annotations.tar too


def test_second_unpack_reuses_the_extraction(tmp_path, official_zip):
    first = unpack(official_zip, tmp_path / "extract", GB)
    marker_file = next(locate(first).rglob("image_0001.jpg"))
    mtime = marker_file.stat().st_mtime_ns
    second = unpack(official_zip, tmp_path / "extract", GB)
    assert second == first
    assert marker_file.stat().st_mtime_ns == mtime


def test_partial_extraction_is_redone(tmp_path, official_zip):
    first = unpack(official_zip, tmp_path / "extract", GB)
    class_root = locate(first)
    victim = next((class_root / "accordion").glob("*.jpg"))
    victim.unlink()
    for marker in (tmp_path / "extract").rglob(".trainjob-complete"):
        marker.unlink()  # as if the job died mid-extract
    again = locate(unpack(official_zip, tmp_path / "extract", GB))
    assert (again / victim.relative_to(class_root)).is_file()


def test_plain_folder_is_used_as_is(class_folders, tmp_path):
    roots = unpack(class_folders, tmp_path / "extract", GB)
    assert roots == [class_folders]
    assert locate(roots) == class_folders
    assert not (tmp_path / "extract").exists() or not list((tmp_path / "extract").iterdir())


def test_class_root_found_below_wrapper_folders(tmp_path):
    root = tmp_path / "upload" / "my-dataset" / "images"
    sampledata.make_class_folders(root, classes=3, per_class=3, background=False)
    (tmp_path / "upload" / "README.txt").write_text("hi")
    assert locate(unpack(tmp_path / "upload", tmp_path / "x", GB)) == root


def test_file_that_is_not_an_archive(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataError) as err:
        unpack(f, tmp_path / "x", GB)
    assert err.value.exit_code == 3 and "data.csv" in str(err.value)


def test_corrupt_archive_is_a_data_error(tmp_path):
    f = tmp_path / "broken.tar.gz"
    f.write_bytes(b"\x1f\x8b\x08" + b"garbage" * 10)
    with pytest.raises(DataError) as err:
        unpack(f, tmp_path / "x", GB)
    assert "broken.tar.gz" in str(err.value)


def test_no_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    with pytest.raises(DataError) as err:
        locate([tmp_path / "flat"])
    assert err.value.exit_code == 3


# --- scan ------------------------------------------------------------------------------------

def test_scan_keeps_odd_images_and_skips_bad_files(class_folders, tmp_path):
    catalog = scan(class_folders, tmp_path / "converted", max_bad_fraction=0.25, threads=4)
    assert BACKGROUND not in catalog.classes
    assert len(catalog.classes) == 6
    names = {Path(s.path).name for s in catalog.samples}
    assert {"gray_0001.jpg", "png_as_jpg_0001.jpg"} <= names
    skipped = {Path(s["path"]).name: s["reason"] for s in catalog.skipped}
    assert set(skipped) == {"truncated_0001.jpg", "empty_0001.jpg", "notes.txt"}
    assert all(skipped.values())
    assert len(catalog.samples) == 6 * 8 + 3
    summary = catalog.summary()
    assert summary["skipped"] == 3 and len(summary["skipped_files"]) == 3
    assert summary["converted_to_rgb"] == catalog.converted >= 1
    assert sum(summary["class_counts"].values()) == len(catalog.samples)
    # the CMYK image was replaced by an RGB file in the converted folder
    [cmyk_class] = [i for i, c in enumerate(catalog.classes) if c == "airplanes"]
    converted = [Path(s.path) for s in catalog.samples
                 if s.label == cmyk_class and Path(s.path).is_relative_to(tmp_path / "converted")]
    assert len(converted) == 1
    with Image.open(converted[0]) as img:
        assert img.mode == "RGB"
    assert not any((class_folders / "airplanes").glob("*.png"))  # the source is untouched


def test_every_kept_image_decodes_in_tensorflow(class_folders, tmp_path):
    tf = pytest.importorskip("tensorflow")
    catalog = scan(class_folders, tmp_path / "converted", max_bad_fraction=0.25)
    for s in catalog.samples:
        image = tf.io.decode_image(tf.io.read_file(s.path), channels=3, expand_animations=False)
        assert image.shape[-1] == 3 and image.shape[0] > 0, s.path


def test_cmyk_is_converted_with_its_colours(tmp_path):
    root = tmp_path / "classes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK").save(root / cls / "c.jpg")
        Image.new("RGB", (16, 16), (20, 200, 30)).save(root / cls / "rgb.jpg")
    catalog = scan(root, tmp_path / "converted")
    assert catalog.converted == 2
    tf = pytest.importorskip("tensorflow")
    converted = [s for s in catalog.samples
                 if Path(s.path).is_relative_to(tmp_path / "converted")]
    assert len(converted) == 2 and all(s.path.endswith(".png") for s in converted)
    for s in converted:
        pixels = tf.io.decode_image(tf.io.read_file(s.path), channels=3).numpy()
        assert np.allclose(pixels.mean(axis=(0, 1)), (200, 30, 30), atol=20)


def test_background_excluded_by_default_and_included_on_request(class_folders, tmp_path):
    without = scan(class_folders, tmp_path / "c1", max_bad_fraction=0.25)
    with_bg = scan(class_folders, tmp_path / "c2", max_bad_fraction=0.25, include_background=True)
    assert BACKGROUND not in without.classes
    assert BACKGROUND in with_bg.classes
    assert with_bg.counts()[BACKGROUND] > 0
    assert len(with_bg.classes) == len(without.classes) + 1
    assert all(BACKGROUND not in s.path for s in without.samples)


def test_classes_are_sorted_and_labels_match(class_folders, tmp_path):
    catalog = scan(class_folders, tmp_path / "c", max_bad_fraction=0.25)
    assert catalog.classes == sorted(catalog.classes)
    for s in catalog.samples:
        if Path(s.path).is_relative_to(class_folders):
            assert Path(s.path).parent.name == catalog.classes[s.label]


def make_classes(root: Path, counts: dict[str, int]) -> Path:
    for label, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sampledata.image_for(label, i, (16, 16)).save(root / cls / f"img_{i}.jpg")
    return root


def test_too_many_bad_files(tmp_path):
    root = make_classes(tmp_path / "d", {"a": 4, "b": 4})
    for i in range(2):
        (root / "a" / f"bad_{i}.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError) as err:  # 2 of 10 bad
        scan(root, tmp_path / "c", max_bad_fraction=0.1)
    assert err.value.exit_code == 3 and "--max-bad-fraction" in str(err.value)
    assert len(scan(root, tmp_path / "c", max_bad_fraction=0.25).skipped) == 2


def test_every_image_corrupt(tmp_path):
    root = tmp_path / "d"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError) as err:
        scan(root, tmp_path / "c", max_bad_fraction=0.99)
    assert err.value.exit_code == 3


def test_a_single_usable_class_is_not_enough(tmp_path):
    root = make_classes(tmp_path / "d", {"a": 5})
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="at least 2"):
        scan(root, tmp_path / "c", max_bad_fraction=0.5)


def test_only_background_is_not_enough(tmp_path):
    root = make_classes(tmp_path / "d", {BACKGROUND: 3, "a": 3})
    with pytest.raises(DataError):
        scan(root, tmp_path / "c")


# --- split ------------------------------------------------------------------------------------

def catalog_of(counts: list[int]) -> Catalog:
    classes = [f"class_{i:02d}" for i in range(len(counts))]
    samples = [Sample(f"/data/{classes[c]}/img_{j:04d}.jpg", c)
               for c, n in enumerate(counts) for j in range(n)]
    return Catalog(Path("/data"), classes, samples)


def per_class(samples: list[Sample]) -> Counter:
    return Counter(s.label for s in samples)


def test_split_is_deterministic_and_complete():
    catalog = catalog_of([20, 40, 13])
    a = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=1)
    b = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=1)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    everything = a.train + a.val + a.test
    assert sorted(everything, key=lambda s: s.path) == sorted(catalog.samples, key=lambda s: s.path)
    assert len({s.path for s in everything}) == len(catalog.samples)


def test_split_does_not_depend_on_listing_order():
    catalog = catalog_of([20, 30])
    shuffled = Catalog(catalog.root, catalog.classes, random.Random(3).sample(
        catalog.samples, len(catalog.samples)))
    a = split(catalog, val_fraction=0.2, test_fraction=0.2, train_per_class=None, seed=5)
    b = split(shuffled, val_fraction=0.2, test_fraction=0.2, train_per_class=None, seed=5)
    assert (set(a.train), set(a.val), set(a.test)) == (set(b.train), set(b.val), set(b.test))


def test_split_differs_for_another_seed():
    catalog = catalog_of([20, 40])
    a = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=1)
    b = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=2)
    assert set(a.test) != set(b.test)
    assert a.sizes() == b.sizes()


def test_split_is_stratified():
    catalog = catalog_of([20, 40, 100])
    s = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=0)
    assert per_class(s.val) == {0: 3, 1: 6, 2: 15}
    assert per_class(s.test) == {0: 3, 1: 6, 2: 15}
    assert per_class(s.train) == {0: 14, 1: 28, 2: 70}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("train_per_class", [None, 1, 30])
def test_tiny_classes_never_crash(n, train_per_class):
    catalog = catalog_of([n, 50])
    s = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=train_per_class,
              seed=0)
    counts = [per_class(part)[0] for part in (s.train, s.val, s.test)]
    assert sum(counts) == n
    assert counts[0] >= 1, "every class keeps a training image"
    if n >= 3 and train_per_class is None:
        assert counts[1] >= 1 and counts[2] >= 1


def test_zero_fractions_put_everything_in_train():
    s = split(catalog_of([10, 3]), val_fraction=0.0, test_fraction=0.0, train_per_class=None,
              seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (13, 0, 0)


def test_train_per_class_protocol():
    catalog = catalog_of([31, 45, 80, 800, 12])
    s = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=30, seed=0)
    train = per_class(s.train)
    for label in range(4):
        assert train[label] == 30, catalog.classes[label]
    assert train[4] < 12  # a small class keeps some images for evaluation
    for label, n in enumerate([31, 45, 80, 800, 12]):
        rest = per_class(s.val)[label] + per_class(s.test)[label]
        assert train[label] + rest == n
        assert abs(per_class(s.val)[label] - per_class(s.test)[label]) <= 1
    again = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=30, seed=0)
    assert again.train == s.train


def test_split_on_scanned_folders(class_folders, tmp_path):
    catalog = scan(class_folders, tmp_path / "c", max_bad_fraction=0.25)
    s = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=42)
    assert sum(s.sizes().values()) == len(catalog.samples)
    assert set(per_class(s.train)) == set(range(len(catalog.classes)))
    assert set(per_class(s.test)) == set(range(len(catalog.classes)))


def test_is_archive_suffixes():
    for name in ("a.zip", "a.tar", "a.tar.gz", "A.TGZ"):
        assert archives.is_archive(Path(name))
    for name in ("a.jpg", "a.gz", "tar"):
        assert not archives.is_archive(Path(name))


# --- converted images: stable and never stale -------------------------------------------------

def cmyk(root: Path, rel: str, rgb: tuple[int, int, int]) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), rgb).convert("CMYK").save(root / rel)


def mean_colour(path: str) -> tuple[int, ...]:
    with Image.open(path) as img:
        return tuple(round(float(v) / 40) for v in np.asarray(img.convert("RGB")).mean(axis=(0, 1)))


def test_changed_source_image_is_converted_again(tmp_path):
    root = make_classes(tmp_path / "d", {"a": 3, "b": 3})
    cmyk(root, "a/odd.jpg", (220, 20, 20))
    first = scan(root, tmp_path / "converted")
    [red] = [s.path for s in first.samples if s.path.endswith(".png")]
    assert mean_colour(red) == mean_colour_of((220, 20, 20))
    cmyk(root, "a/odd.jpg", (20, 20, 220))  # the dataset was fixed in place
    second = scan(root, tmp_path / "converted")
    [blue] = [s.path for s in second.samples if s.path.endswith(".png")]
    assert mean_colour(blue) == mean_colour_of((20, 20, 220))


def mean_colour_of(rgb: tuple[int, int, int]) -> tuple[int, ...]:
    img = Image.new("RGB", (16, 16), rgb).convert("CMYK").convert("RGB")
    return tuple(round(float(v) / 40) for v in np.asarray(img).mean(axis=(0, 1)))


def test_split_is_the_same_wherever_the_data_was_extracted(tmp_path):
    colours = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230),
               (230, 20, 230), (128, 128, 128), (240, 240, 240)]

    def split_colours(root: Path) -> tuple:
        make_classes(root, {"a": 2, "b": 10})
        for i, rgb in enumerate(colours):
            cmyk(root, f"a/cmyk_{i}.jpg", rgb)
        catalog = scan(root, root.parent / "converted")
        s = split(catalog, val_fraction=0.2, test_fraction=0.2, train_per_class=None, seed=4)
        return tuple(tuple(sorted(mean_colour(x.path) for x in part if x.path.endswith(".png")))
                     for part in (s.train, s.val, s.test))

    results = [split_colours(tmp_path / f"pod{i}" / "extract" / "root") for i in range(3)]
    assert len(set(results[0][0] + results[0][1] + results[0][2])) == 8  # all told apart
    assert results[1] == results[0] and results[2] == results[0]


def test_identical_cmyk_files_convert_in_parallel_without_losses(tmp_path):
    """Duplicates across classes (Caltech101 has some) convert concurrently to one file."""
    root = tmp_path / "classes"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (64, 64), (90, 160, 30)).convert("CMYK").save(root / cls / f"{i}.jpg")
    catalog = scan(root, tmp_path / "converted", threads=8)
    assert catalog.skipped == []
    assert catalog.converted == 40
    assert len(list((tmp_path / "converted").iterdir())) == 1


# --- the fallback without tarfile's data filter (Python < 3.11.4) ---------------------------

@pytest.fixture
def no_data_filter(monkeypatch):
    """Extract as Python < 3.11.4 does: no 'data' filter, only trainjob's own checks."""
    fallback = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    monkeypatch.setattr(archives, "_TAR_FILTER", fallback)


@pytest.mark.parametrize("chain", [
    # a -> . makes a/zzz land in the extraction folder itself, where '..' leads out of it
    [("a", "."), ("a/zzz", ".."), ("a/zzz/x", b"pwned")],
    # a link that is harmless when made, until a later link redirects a folder it crosses
    [("l1", "b/../evil.txt"), ("b", "."), ("l1", b"pwned")],
], ids=["dot-then-dotdot", "retargeted-later"])
def test_link_chains_are_refused_without_the_data_filter(area, no_data_filter, chain):
    def build(tar):
        good_members(tar)
        for name, what in chain:
            if isinstance(what, bytes):
                add_bytes(tar, name, what)
            else:
                add_special(tar, name, tarfile.SYMTYPE, what)
    archive = make_tar(area / "src" / "chain.tar", build)
    err = assert_unsafe(archive, area, "outside")
    assert "refusing" in str(err)
    assert not [p for p in area.rglob("*") if p.is_file() and p.read_bytes() == b"pwned"]


def test_safe_archives_still_extract_without_the_data_filter(area, no_data_filter):
    def build(tar):
        good_members(tar)
        add_special(tar, "data/cats/alias.jpg", tarfile.SYMTYPE, "image_0.jpg")
        add_special(tar, "data/dogs/same.jpg", tarfile.LNKTYPE, "data/cats/image_1.jpg")
    roots = unpack(make_tar(area / "src" / "ok.tar", build), area / "work" / "extract", GB)
    cats, dogs = locate(roots) / "cats", locate(roots) / "dogs"
    assert (cats / "alias.jpg").read_bytes() == (cats / "image_0.jpg").read_bytes()
    assert (dogs / "same.jpg").read_bytes() == (cats / "image_1.jpg").read_bytes()
    assert_nothing_outside(area)


# --- the training order: shuffled by seed, the split itself unchanged ------------------------

def reference_split(catalog: Catalog, seed: int, val: float, test: float) -> tuple[set, set, set]:
    """The split as it was defined before the training order was shuffled: per class, sort
    by path, shuffle with Random(f'{seed}:{class}'), then train | val | test."""
    out: tuple[set, set, set] = (set(), set(), set())
    for label, name in enumerate(catalog.classes):
        items = sorted((s for s in catalog.samples if s.label == label), key=lambda s: s.path)
        random.Random(f"{seed}:{name}").shuffle(items)
        n_train, n_val = _split_sizes(len(items), val, test, None)
        out[0].update(items[:n_train])
        out[1].update(items[n_train:n_train + n_val])
        out[2].update(items[n_train + n_val:])
    return out


def test_training_order_mixes_classes_above_the_shuffle_buffer():
    """12,600 training images in 30 classes: tf.data's 10,000-image shuffle buffer only mixes
    what is near in the list, so the list itself must not be sorted by class."""
    catalog = catalog_of([600] * 30)
    s = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=7)
    assert len(s.train) == 12_600
    first_buffer = {x.label for x in s.train[:10_000]}
    assert first_buffer == set(range(30)), f"classes missing from the first 10,000: " \
        f"{sorted(set(range(30)) - first_buffer)}"
    first_batches = {x.label for x in s.train[:256]}  # --steps-per-epoch 8 at batch size 32
    assert len(first_batches) >= 25, f"only {len(first_batches)} classes in the first 256"
    assert (set(s.train), set(s.val), set(s.test)) == reference_split(catalog, 7, 0.15, 0.15)
    again = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=7)
    assert again.train == s.train  # the same seed gives the same order: resume depends on it
    other = split(catalog, val_fraction=0.15, test_fraction=0.15, train_per_class=None, seed=8)
    assert [x.path for x in other.train] != [x.path for x in s.train]
