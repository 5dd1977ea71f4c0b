"""inputs.py and augment.py: decode, resize, cache, deterministic per-epoch order and
augmentation (in (seed, epoch, sample id), wherever the sample falls), shards, resumes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import imagefiles
from PIL import Image

import trainjob
from trainjob.data.catalog import Sample
from trainjob.data.images import check_image
from trainjob.train import augment, inputs

N, CLASSES, SIZE = 20, 4, 16


@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    out = []
    for i in range(N):
        path = tmp_path / f"{i}.png"
        Image.fromarray(_structured(i)).save(path)
        out.append(Sample(str(path), i % CLASSES))
    gray = tmp_path / "gray.jpg"
    Image.fromarray(np.full((10, 10), 250, np.uint8)).save(gray)
    out.append(Sample(str(gray), 0))
    return out


def _structured(i: int) -> np.ndarray:
    """Image i: red is flat at i * 10, so any crop, flip or zoom keeps it and the index can be
    read back; green is a left-to-right gradient and blue marks the top-left corner, so a
    flip, a crop or a zoom changes the picture (a flat grey one would come back unchanged,
    hiding an augmentation that ignores its seed)."""
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = i * 10
    image[..., 1] = np.linspace(0, 255, 30, dtype=np.uint8)[None, :]
    image[:6, :6, 2] = 255
    return image


def _stream(samples, first, last, *, skip=0, augment=False, seed=3, cache="memory", tmp=None,
            shuffle=True, repeat=False, shard=(0, 1), batch=4):
    base = inputs.encoded(samples, cache, tmp, "train")
    steps = inputs.steps_for(len(samples), 4, None)
    return inputs.training_stream(base, len(samples), CLASSES, image_size=SIZE,
                                  batch_size=batch, steps=steps * 4 // batch, repeat=repeat,
                                  shuffle=shuffle, augment=augment, seed=seed,
                                  first_epoch=first, epochs=last, skip_batches=skip,
                                  shard=shard)


def _order(ds) -> list[int]:
    return [int(round(v / 10)) for x, _ in ds for v in x.numpy()[:, 0, 0, 0]]


def test_decoded_images_are_resized_rgb_uint8(samples):
    ds = inputs.decoded(samples, SIZE, "none", None, "x")
    images = [x.numpy() for x, _ in ds]
    assert all(img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8 for img in images)
    assert images[-1].min() == images[-1].max() == 250  # grayscale became 3 equal channels


def test_each_epoch_is_a_full_pass_in_its_own_seeded_order(samples):
    per_epoch = len(samples) // 4 + 1
    batches = list(_stream(samples, 0, 3))
    assert len(batches) == 3 * per_epoch
    x, y = batches[0]
    assert x.dtype.name == "uint8" and y.shape == (4, CLASSES)  # the model casts to float32
    orders = [_order(batches[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    for order in orders:
        assert sorted(o for o in order if o < N) == list(range(N))
    assert orders[0] != orders[1] != orders[2]


def test_resumed_stream_repeats_the_uninterrupted_one(samples):
    """A run resumed at epoch 2 (or mid-epoch 2) sees the batches it would have seen."""
    per_epoch = len(samples) // 4 + 1
    full = list(_stream(samples, 0, 4, augment=True))
    resumed = list(_stream(samples, 2, 4, augment=True))
    assert len(resumed) == len(full) - 2 * per_epoch
    for (a, la), (b, lb) in zip(full[2 * per_epoch:], resumed):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(la.numpy(), lb.numpy())
    mid = list(_stream(samples, 2, 4, skip=2, augment=True))
    assert len(mid) == len(resumed) - 2
    np.testing.assert_array_equal(mid[0][0].numpy(), resumed[2][0].numpy())
    # The equality above means something only if augmentation did change the images.
    plain = list(_stream(samples, 2, 4))
    assert _order(plain) == _order(resumed)
    assert any(not np.array_equal(a.numpy(), p.numpy()) for (a, _), (p, _) in zip(resumed, plain))


def test_another_seed_gives_another_order(samples):
    assert _order(_stream(samples, 0, 1, seed=1)) != _order(_stream(samples, 0, 1, seed=2))


def test_augmentation_changes_images_but_not_their_range(samples):
    plain = np.concatenate([x.numpy() for x, _ in _stream(samples, 0, 1)])
    augmented = np.concatenate([x.numpy() for x, _ in _stream(samples, 0, 1, augment=True)])
    assert augmented.shape == plain.shape
    assert augmented.min() >= 0 and augmented.max() <= 255
    # Same order (same seed), so image k of one is image k of the other.
    assert _order(_stream(samples, 0, 1, augment=True)) == _order(_stream(samples, 0, 1))
    changed = [not np.array_equal(a, p) for a, p in zip(augmented, plain)]
    assert sum(changed) >= len(changed) // 2, f"augmentation changed {sum(changed)} images"
    # A flip or a crop moves the gradient and the corner mark, never the flat red channel.
    np.testing.assert_array_equal(augmented[..., 0], plain[..., 0])


def test_file_cache_survives_a_killed_writer(samples, tmp_path):
    """A run killed while writing the file cache leaves a lockfile; the next run must not
    refuse the cache because of it."""
    cache_dir = tmp_path / "tfcache"
    cache_dir.mkdir()
    key = inputs.fingerprint_files([s.path for s in samples], "encoded")
    (cache_dir / f"train-{key}_0.lockfile").write_text("")
    assert len(list(_stream(samples, 0, 1, cache="file", tmp=cache_dir))) == len(samples) // 4 + 1
    assert any(p.name.endswith(".index") for p in cache_dir.iterdir())
    assert len(list(_stream(samples, 0, 1, cache="file", tmp=cache_dir))) == len(samples) // 4 + 1


def test_auto_pipeline_cache_keeps_train_and_val_within_the_budget(caplog):
    caplog.set_level(logging.INFO, logger="trainjob.train.inputs")
    per_image = 224 * 224 * 3 + inputs.IMAGE_OVERHEAD
    budget = inputs.MemoryBudget(ram_bytes=1000 * per_image, fraction=0.5)  # room for 500
    assert inputs.choose_pipeline_cache(400, 224, "train", budget) == "memory"
    assert "pipeline cache for train: in memory" in caplog.text
    # What the training set took is gone from the budget: 150 more do not fit, 100 do.
    assert inputs.choose_pipeline_cache(150, 224, "val", budget) == "file"
    assert "pipeline cache for val: a file" in caplog.text and "as given" in caplog.text
    assert inputs.choose_pipeline_cache(100, 224, "val", budget) == "memory"
    big = inputs.MemoryBudget(ram_bytes=1000 * per_image, fraction=0.5)
    assert inputs.choose_pipeline_cache(501, 224, "train", big) == "file"  # never OOM by default
    assert inputs.choose_pipeline_cache(501, 64, "train", big) == "memory"  # smaller images


def test_memory_limit_is_the_cgroup_limit_where_lower(tmp_path):
    physical, _ = inputs.memory_limit(tmp_path / "none", tmp_path / "none")
    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")  # the root: no limit
    (v2 / "kubepods" / "pod1" / "memory.max").write_text(f"{2 * 2**30}\n")
    own = tmp_path / "cgroup"
    own.write_text("0::/kubepods/pod1\n")
    limit = inputs.memory_limit(v2, own)
    assert limit == (2 * 2**30, f"cgroup limit, {v2}/kubepods/pod1/memory.max")
    (v2 / "memory.max").write_text(f"{2**30}\n")  # a container's own namespace: its root
    assert inputs.memory_limit(v2, own)[0] == 2**30
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    own.write_text("4:memory:/\n")
    assert inputs.memory_limit(v1, own) == (physical, "physical")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    assert inputs.memory_limit(v1, own)[0] == min(physical, 3 * 2**30)


@pytest.mark.parametrize("what", ["decoded", "encoded"])
@pytest.mark.parametrize("ram, files", [(2**40, False), (2**10, True)])
def test_auto_caches_in_a_file_when_memory_is_short(samples, tmp_path, monkeypatch, ram, files,
                                                    what):
    monkeypatch.setattr(inputs, "_budget", inputs.MemoryBudget(ram_bytes=ram))
    cache_dir = tmp_path / "tfcache"
    ds = inputs.decoded(samples, SIZE, "auto", cache_dir, "train") if what == "decoded" else \
        inputs.encoded(samples, "auto", cache_dir, "train")
    assert len(list(ds)) == len(samples)
    written = list(cache_dir.glob("train-*.index")) if cache_dir.exists() else []
    assert bool(written) is files


def test_auto_budget_counts_the_training_files_bytes(caplog):
    """The training set is cached encoded: its files' bytes count, not 224 x 224 x 3 each."""
    caplog.set_level(logging.INFO, logger="trainjob.train.inputs")
    budget = inputs.MemoryBudget(ram_bytes=10 * 2**20, fraction=0.5)  # 5 MiB
    assert inputs.choose_pipeline_cache(100, 224, budget=budget, encoded_bytes=100 * 35_000) \
        == "memory"  # 100 decoded images at 224 px (14 MiB) would not fit
    assert "100 images take 0.00 GiB encoded" in caplog.text
    assert inputs.choose_pipeline_cache(100, 224, budget=budget, encoded_bytes=2 * 2**20) == "file"


def test_steps_per_epoch():
    assert inputs.steps_for(100, 32, None) == 4
    assert inputs.steps_for(5, 32, None) == 1
    assert inputs.steps_for(100, 32, 7) == 7


@pytest.mark.parametrize("what", ["decoded", "encoded"])
def test_file_cache_is_not_served_stale_when_an_image_changes_in_place(samples, tmp_path, what):
    """A prefix re-synced in place keeps its paths: the cache key must see the new content."""
    cache_dir = tmp_path / "tfcache"

    def images():
        if what == "decoded":
            return [x.numpy() for x, _ in inputs.decoded(samples, SIZE, "file", cache_dir,
                                                         "train")]
        return [augment.decode(data).numpy()
                for data, _, _ in inputs.encoded(samples, "file", cache_dir, "train")]

    first = images()
    assert first[3][..., 0].max() == 30
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(samples[3].path)
    os.utime(samples[3].path, ns=(1_700_000_000_000_000_000,) * 2)  # a different mtime, surely
    again = images()
    assert again[3].min() == again[3].max() == 200, "the file cache served the old image"
    assert all((a == b).all() for i, (a, b) in enumerate(zip(first, again)) if i != 3)


def test_file_cache_another_job_is_writing_is_left_alone(samples, tmp_path):
    """Two jobs on one host, same images and size: the second must neither delete the first
    one's TF lockfile (both would write the same cache files) nor fail."""
    cache_dir = tmp_path / "tfcache"
    cache_dir.mkdir()
    prefix = cache_dir / f"train-{inputs.fingerprint_files([s.path for s in samples], 'encoded')}"
    lockfile = prefix.with_name(f"{prefix.name}_0.lockfile")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"""
import sys
from pathlib import Path
from trainjob.store import hostcache
with hostcache.session():
    with hostcache.using(Path({str(prefix)!r})):
        Path({str(lockfile)!r}).write_text("")  # mid-way through writing the cache
    print("ready", flush=True)
    sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(trainjob.__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "ready"
        batches = list(_stream(samples, 0, 1, cache="file", tmp=cache_dir))
        assert len(batches) == len(samples) // 4 + 1
        assert lockfile.exists(), "deleted the lockfile of a job still writing the cache"
        assert not prefix.with_name(f"{prefix.name}.index").exists()
    finally:
        holder.communicate("", timeout=60)
    # The holder is gone and its lockfile stays, as after a kill: now it is stale.
    assert len(list(_stream(samples, 0, 1, cache="file", tmp=cache_dir))) == len(samples) // 4 + 1
    assert prefix.with_name(f"{prefix.name}.index").exists() and not lockfile.exists()


@pytest.mark.parametrize("name", list(imagefiles.FILES))
def test_every_image_the_scan_accepts_decodes_to_the_colours_pillow_shows(name, tmp_path):
    """Each format and mode the scan accepts, through the scan's check and then the
    pipeline's decode at the image's own size (the resize is the identity), against
    Pillow's RGB of the original: a paletted BMP read as grey palette indices, say, fails."""
    path = tmp_path / name
    imagefiles.FILES[name](path)
    (tmp_path / "converted").mkdir()
    checked = check_image(path, tmp_path / "converted")
    assert checked.usable is not None, f"{name} ({checked.mode}): {checked.reason}"
    decoded = inputs.decode_image(str(checked.usable), imagefiles.SIDE).numpy()
    expected = imagefiles.pillow_rgb(path)
    assert decoded.shape == expected.shape == (imagefiles.SIDE, imagefiles.SIDE, 3)
    worst = int(np.abs(decoded.astype(int) - expected.astype(int)).max())
    how = "as is" if checked.usable == path else "converted"
    assert worst == 0, f"{name} ({checked.mode}, {how}) decodes up to {worst} levels off " \
                       "Pillow's colours"


def _by_sample(batches) -> dict[int, np.ndarray]:
    """Each image of the batches keyed by its sample (the flat red channel tells which)."""
    return {int(np.rint(x[0, 0, 0] / 10)): x for xs, _ in batches for x in xs.numpy()}


def test_augmentation_follows_the_sample_not_its_position(samples):
    """The same epoch in another order (or another batching) augments every sample alike:
    what a resume with other workers, or the packed stream, relies on."""
    shuffled = list(_stream(samples, 1, 2, augment=True))
    in_order = list(_stream(samples, 1, 2, augment=True, shuffle=False, batch=2))
    assert _order(shuffled) != _order(in_order)
    a, b = _by_sample(shuffled), _by_sample(in_order)
    assert sorted(a) == sorted(b) and len(a) == len(samples)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"sample {k}")
    other_epoch = _by_sample(_stream(samples, 2, 3, augment=True))
    assert sum(not np.array_equal(a[k], other_epoch[k]) for k in a) >= len(a) // 2


def _per_image_stream(samples, first, last, *, shard, batch, steps, skip=0):
    """inputs.training_stream as it was before images were augmented a batch per call:
    files read one per element, each image augmented in its own tf.data call, then
    batched; what a run trains on must not have changed."""
    import tensorflow as tf
    n = len(samples)
    base = tf.data.Dataset.from_tensor_slices(
        ([s.path for s in samples], [s.label for s in samples], tf.range(n, dtype=tf.int64)))
    base = base.map(lambda path, label, i: (tf.io.read_file(path), label, i)).cache()

    def one_epoch(epoch):
        ds = base.repeat().enumerate().map(lambda j, e: (*e, j // n))
        ds = ds.shuffle(n, seed=3 * 100_003 + epoch, reshuffle_each_iteration=False)
        ds = ds.enumerate().filter(lambda i, _e: i % shard[1] == shard[0]).map(lambda _i, e: e)
        skipped = tf.where(epoch == first, tf.constant(skip, tf.int64), 0)
        ds = ds.skip(skipped * batch).map(
            lambda data, label, i, draw: (augment.train_image(
                data, i, epoch, seed=3, image_size=SIZE, augment=True, draw=draw), label))
        return ds.batch(batch).take(steps - skipped)

    return tf.data.Dataset.range(first, last).flat_map(one_epoch)


@pytest.mark.parametrize("shard, skip", [((0, 1), 0), ((1, 2), 3)])
def test_the_stream_trains_on_the_images_it_did_one_call_per_image(samples, shard, skip):
    """Batches augmented in one call each, and files read a batch per call, hand out the
    very bytes and labels of the per-image stream: same order, same draws, same resume."""
    steps = 7  # 28 (or 14) images of 21 samples: some drawn twice, with draw 1
    got = list(_worker_stream(samples, shard, batch=4 // shard[1], steps=steps, skip=skip,
                              first=0, last=2))
    want = list(_per_image_stream(samples, 0, 2, shard=shard, batch=4 // shard[1],
                                  steps=steps, skip=skip))
    assert len(got) == len(want) == 2 * steps - skip
    for (x, y), (wx, wy) in zip(got, want):
        np.testing.assert_array_equal(x.numpy(), wx.numpy())
        np.testing.assert_array_equal(np.argmax(y.numpy(), axis=1), wy.numpy())


def _worker_stream(samples, shard, *, batch, steps, skip=0, first=0, last=2):
    base = inputs.encoded(samples, "memory", None, "train")
    return inputs.training_stream(base, len(samples), CLASSES, image_size=SIZE,
                                  batch_size=batch, steps=steps, repeat=True, shuffle=True,
                                  augment=True, seed=3, first_epoch=first, epochs=last,
                                  skip_batches=skip, shard=shard)


def test_shards_split_every_epoch_between_the_workers(samples):
    """Two workers, as session streams them (the data wraps; per-replica batches, as many
    steps each): element i of the one-worker epoch goes to worker i % 2, the same image."""
    steps = 12  # 48 images from 21 samples: each epoch draws some samples twice or more
    one = np.concatenate([x.numpy() for x, _ in _worker_stream(samples, (0, 1), batch=4,
                                                                steps=steps)])
    shards = [np.concatenate([x.numpy() for x, _ in _worker_stream(samples, (k, 2), batch=2,
                                                                    steps=steps)])
              for k in range(2)]
    assert len(one) == 2 * 4 * steps and all(len(s) == 2 * 2 * steps for s in shards)
    for epoch in range(2):
        mine = one[epoch * 4 * steps:(epoch + 1) * 4 * steps]
        for k in range(2):
            np.testing.assert_array_equal(shards[k][epoch * 2 * steps:(epoch + 1) * 2 * steps],
                                          mine[k::2])
    # A sample drawn twice in one epoch gets two draws of the augmentation, not one twice.
    first_epoch = one[:4 * steps]
    red = first_epoch[:, 0, 0, 0]
    twice = [v for v in set(red.tolist()) if (red == v).sum() > 1 and v != 250]  # not grey
    assert len(twice) >= 3
    assert all(not np.array_equal(*first_epoch[red == v][:2]) for v in twice)
    # A worker resumed mid-epoch (session: skip * local) goes on with the batches it would
    # have had.
    resumed = [x.numpy() for x, _ in _worker_stream(samples, (1, 2), batch=2, steps=steps,
                                                     skip=5, first=1)]
    full = [x.numpy() for x, _ in _worker_stream(samples, (1, 2), batch=2, steps=steps)]
    assert len(resumed) == 2 * steps - steps - 5
    for a, b in zip(resumed, full[steps + 5:]):
        np.testing.assert_array_equal(a, b)
