"""Input pipeline throughput at 224 px with the training augmentation, side by side on the
same Caltech-sized JPEGs (``sampledata.make_photo_folders``: 300 x 180-260 px, ~34 KB),
each contender in a process of its own:

- trainjob's classic path (``inputs.encoded`` + ``inputs.training_stream``, what a run
  trains on: uint8 pixels, which the model casts, and one-hot labels), epoch 1 (reads the
  files) and epoch 2 (the cached bytes);
- the packed path (``trainjob dataset pack`` of the same images to a local folder, then
  ``train.packedinput.training_stream``, what a run on it trains on: the shards fetched
  through the stream buffer, checked, parsed, decoded and augmented), epoch 1 (its train
  split, 70% of the images: rates are per image);
- the previous pipeline (decode + antialiased resize, cached decoded, crop + resize);
- ``keras.utils.image_dataset_from_directory`` with Keras' RandomFlip, and with
  ``tf.image.random_flip_left_right``;
- the floor: decode (accurate IDCT) + one bilinear resize, batched.

Per core: tf.data held to one thread (private thread pool 1, intra-op 1), images per process
CPU-second. All cores: tf.data's defaults, images per wall second. Contenders take turns
within each round, each in a process of its own, as a job is; figures are medians over the
rounds, ratios the medians of each round's ratio, and the load average is recorded at every
round. Then the stages of the training op, per core, cumulative, on bytes in memory.

``python benchmarks/input_pipeline.py [ROUNDS]``; ``run_all.py input_pipeline`` writes
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sampledata

SIZE, BATCH, SEED = 224, 32, 42
CLASSES, PER_CLASS = 30, 100
ROUNDS = 5
AUTOTUNE = -1  # tf.data.AUTOTUNE


CONTENDERS = ("trainjob", "packed", "previous", "idfd_keras_flip", "idfd_tf_flip", "floor")


def main(rounds: int = ROUNDS) -> dict:
    import keras
    import tensorflow as tf

    from trainjob.train import augment, inputs

    work = Path(tempfile.mkdtemp(prefix="bench-pipe-"))
    try:
        root = work / "images"
        files = sorted(sampledata.make_photo_folders(root, CLASSES, PER_CLASS))
        _pack(root, work / "packed")
        sizes = [p.stat().st_size for p in files]
        results = {"images": len(files), "mean_kb": round(statistics.mean(sizes) / 1000, 1),
                   "image_size": SIZE, "batch_size": BATCH, "rounds": rounds,
                   "machine": _machine(tf, keras)}
        for mode in ("per_core", "all_cores"):
            results[mode] = _rounds(work, rounds, mode)
        results["stages"] = _stages(tf, augment, inputs, [str(p) for p in files], rounds)
        results["ratios"] = _ratios(results)
        print(json.dumps(results, indent=2))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def one(name: str, per_core: bool, work: Path) -> list[tuple]:
    """(images, wall s, CPU s) of each timed epoch of contender ``name``, in this process:
    ``main`` starts a process for every contender of every round, as a job is a process
    with one stream (in one shared process, the classic stream's later rounds ran 10-30%
    slower than its first; docs/benchmarks.md, History)."""
    import keras
    import tensorflow as tf

    from trainjob.data.catalog import Sample
    from trainjob.train import augment, inputs

    root = work / "images"
    files = sorted(root.rglob("*.jpg"))
    samples = [Sample(str(p), int(p.parent.name.split("_")[1])) for p in files]
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    n, steps = len(samples), -(-len(samples) // BATCH)

    def limited(ds):
        if per_core:
            opts = tf.data.Options()
            opts.threading.private_threadpool_size = 1
            opts.threading.max_intra_op_parallelism = 1
            ds = ds.with_options(opts)
        return ds

    def epochs(make: Callable[[int], object], count: int) -> list[tuple]:
        """(images, wall s, CPU s) of each epoch; make(e) -> that epoch's dataset."""
        out = []
        for e in range(count):
            ds = limited(make(e))
            out.append(_timed(lambda ds=ds: sum(int(b[0].shape[0]) for b in ds)))
        return out

    def trainjob():
        stream = limited(inputs.training_stream(
            inputs.encoded(samples, "memory", work, "bench"), n, CLASSES, image_size=SIZE,
            batch_size=BATCH, steps=steps, repeat=False, shuffle=True, augment=True,
            seed=SEED, first_epoch=0, epochs=2))
        it = iter(stream)
        return [_timed(lambda: sum(int(next(it)[0].shape[0]) for _ in range(steps)))
                for _ in range(2)]

    def previous():
        stream = limited(_previous_stream(tf, paths, labels, n, steps))
        it = iter(stream)
        return [_timed(lambda: sum(int(next(it)[0].shape[0]) for _ in range(steps)))
                for _ in range(2)]

    def packed():
        train = _packed_stream(work / "packed", work / f"stream-{os.getpid()}")
        return epochs(lambda e: train(e, e + 1, 0), 1)

    def idfd(keras_flip):
        def run():
            def make(e):
                ds = keras.utils.image_dataset_from_directory(
                    str(root), image_size=(SIZE, SIZE), batch_size=BATCH, shuffle=True,
                    seed=SEED + e, verbose=False)
                if keras_flip:
                    flip = keras.layers.RandomFlip("horizontal", seed=SEED)
                    ds = ds.map(lambda x, y: (flip(x, training=True), y),
                                num_parallel_calls=AUTOTUNE)
                else:
                    ds = ds.map(lambda x, y: (tf.image.random_flip_left_right(x), y),
                                num_parallel_calls=AUTOTUNE)
                return ds.prefetch(AUTOTUNE)
            return epochs(make, 1)
        return run

    def floor():
        return epochs(lambda e: tf.data.Dataset.from_tensor_slices((paths, labels)).map(
            lambda p, y: (tf.image.resize(augment.decode(tf.io.read_file(p)), [SIZE, SIZE]),
                          y), num_parallel_calls=AUTOTUNE).batch(BATCH).prefetch(AUTOTUNE), 1)

    contenders = {"trainjob": trainjob, "packed": packed, "previous": previous,
                  "idfd_keras_flip": idfd(True), "idfd_tf_flip": idfd(False), "floor": floor}
    _warm(tf, paths)
    return contenders[name]()


def _in_own_process(name: str, mode: str, work: Path) -> list[tuple]:
    done = subprocess.run([sys.executable, __file__, "--one", name, mode, str(work)],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("ONE ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{name} ({mode}) failed: {done.stderr[-2000:]}")
    return [tuple(epoch) for epoch in json.loads(lines[-1][4:])]


def _timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    images = fn()
    return images, time.perf_counter() - wall, time.process_time() - cpu


def _rounds(work: Path, rounds: int, mode: str) -> dict:
    runs: dict[str, list] = {name: [] for name in CONTENDERS}
    loads = []
    for r in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for name in CONTENDERS:
            runs[name].append(_in_own_process(name, mode, work))
            print(f"{mode.replace('_', ' ')} round {r} {name}: " + ", ".join(
                f"e{e + 1} {m / w:.0f}/s {m / c:.0f}/cpu-s" for e, (m, w, c)
                in enumerate(runs[name][-1])), file=sys.stderr, flush=True)
    loads.append(round(os.getloadavg()[0], 2))
    out = {"load_1min": loads, "contenders": {}}
    for name, per_round in runs.items():
        out["contenders"][name] = [
            {"per_cpu_s": round(statistics.median(m / c for m, _, c in epoch)),
             "per_wall_s": round(statistics.median(m / w for m, w, _ in epoch)),
             "per_cpu_s_runs": [round(m / c) for m, _, c in epoch],
             "per_wall_s_runs": [round(m / w) for m, w, _ in epoch]}
            for epoch in zip(*per_round)]
    return out


def _stages(tf, augment, inputs, paths: list[str], rounds: int) -> dict:
    """Per core, cumulative: each row adds one step of the training op to the one before,
    on encoded bytes held in memory (reading the files is its own row)."""
    def draw(i):
        flip, *window = tf.unstack(augment.sample_seeds(SEED, tf.constant(0, tf.int64), i))
        return flip, window

    def window(image, i):
        _, seeds = draw(i)
        s = tf.shape(image)
        y, x, h, w = augment.crop_window(s[0], s[1], seeds)
        return image[y:y + h, x:x + w]

    def flip(image, i):
        return tf.image.stateless_random_flip_left_right(image, draw(i)[0])

    def resize(image):
        return tf.image.resize(image, [SIZE, SIZE])

    def first(image):  # a cheap consumer per image
        return image[0, 0, 0]

    steps = {
        "read the file (64 per tf.data call, as inputs.encoded)": None,
        "decode (accurate IDCT)": lambda d, i: first(augment.decode(d)),
        "+ window (draw + slice)": lambda d, i: first(window(augment.decode(d), i)),
        "+ flip": lambda d, i: first(flip(window(augment.decode(d), i), i)),
        "+ bilinear resize to 224": lambda d, i: first(resize(flip(window(augment.decode(d), i),
                                                                    i))),
        "+ round to uint8": lambda d, i: first(augment.round_to_uint8(
            resize(flip(window(augment.decode(d), i), i)))),
        "+ batching (32)": lambda d, i: augment.round_to_uint8(
            resize(flip(window(augment.decode(d), i), i))),
        "+ one tf.data call per batch, not per image (augment.train_batch)": None,
        "+ one-hot labels (the end of training_stream)": None,
        "+ float32 cast (before; now the model's, on the accelerator)": None,
        "previous: decode + antialiased resize": lambda d, i: first(augment.eval_image(d, SIZE)),
    }
    files = tf.data.Dataset.from_tensor_slices((paths, tf.range(len(paths), dtype=tf.int64)))
    cached = files.map(lambda p, i: (tf.io.read_file(p), i)).cache()
    for _ in cached:  # fill
        pass
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = 1
    opts.threading.max_intra_op_parallelism = 1

    def dataset(name, fn):
        if name.startswith("read"):
            return files.batch(inputs.READ_BATCH).map(
                lambda p, i: tf.strings.length(inputs.read_files(p)), num_parallel_calls=AUTOTUNE)
        if name.startswith("+ batching"):
            return cached.map(fn, num_parallel_calls=AUTOTUNE).batch(BATCH)
        if fn is not None:
            return cached.map(fn, num_parallel_calls=AUTOTUNE).batch(256)
        ds = cached.batch(BATCH).map(lambda d, i: (augment.train_batch(
            d, i, tf.zeros_like(i), tf.constant(0, tf.int64), seed=SEED, image_size=SIZE,
            augment=True), tf.zeros_like(i)), num_parallel_calls=AUTOTUNE)
        if name.startswith("+ one-hot"):
            return inputs.finish(ds, CLASSES, pixels=tf.uint8)
        return inputs.finish(ds, CLASSES) if name.startswith("+ float") else ds

    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            ds = dataset(name, fn).with_options(opts)
            m, _, c = _timed(lambda ds=ds: sum(
                int(tf.shape(b[0] if isinstance(b, tuple) else b)[0]) for b in ds))
            runs[name].append(m / c)
    out, before = {}, 0.0
    for name, rates in runs.items():
        rate = statistics.median(rates)
        us = 1e6 / rate
        alone = name.startswith(("read", "previous"))  # not a step of the chain
        out[name] = {"per_cpu_s": round(rate), "us_per_image": round(us),
                     "step_us": round(us if alone else us - before)}
        if not alone:
            before = us
    return out


def paired_ratio(ours: list[int], theirs: list[int]) -> float:
    """The median of the rounds' ratios of two contenders' rates (round by round)."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


def _ratios(results: dict) -> dict:
    """Each ratio is the median of its rounds' ratios: the contenders take turns within a
    round, so a slow spell of the machine weighs on both sides of a ratio, not on one."""
    def runs(mode, name, epoch=0):
        return results[mode]["contenders"][name][epoch][
            "per_cpu_s_runs" if mode == "per_core" else "per_wall_s_runs"]

    def ratio(a: list[int], b: list[int]) -> float:
        return round(paired_ratio(a, b), 2)

    out = {}
    for mode in ("per_core", "all_cores"):
        ours = {"trainjob_e1": runs(mode, "trainjob"), "trainjob_e2": runs(mode, "trainjob", 1),
                "packed_e1": runs(mode, "packed")}
        out[mode] = {
            **{f"{k}_vs_idfd_keras_flip": ratio(v, runs(mode, "idfd_keras_flip"))
               for k, v in ours.items()},
            **{f"{k}_of_floor": ratio(v, runs(mode, "floor")) for k, v in ours.items()},
            "trainjob_e1_vs_previous_e1": ratio(ours["trainjob_e1"], runs(mode, "previous")),
            "trainjob_e2_vs_previous_e2": ratio(ours["trainjob_e2"],
                                                runs(mode, "previous", 1))}
    return out


def _previous_stream(tf, paths, labels, n, steps):
    """The pipeline before this one (trainjob at 397f6b4), two epochs: decode + antialiased
    resize, cached decoded; per epoch a shuffle, a flip and a square crop of 80-100% of the
    side, resized back (bilinear), drawn by position; then the float cast and one-hot."""
    from trainjob.train import augment, inputs

    base = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda p, y: (inputs.decode_image(p, SIZE), y), num_parallel_calls=AUTOTUNE).cache()

    def crop(image, seed):
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
        side = tf.cast(tf.round(tf.random.stateless_uniform([], seeds[1], 0.8, 1.0) * SIZE),
                       tf.int32)
        image = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), seeds[2])
        return augment.to_uint8(tf.image.resize(image, [SIZE, SIZE]))

    def one_epoch(epoch):
        ds = base.shuffle(n, seed=SEED * 100_003 + epoch, reshuffle_each_iteration=False)
        ds = ds.enumerate().map(lambda i, xy: (crop(xy[0], tf.stack([SEED + epoch, i])),
                                               xy[1]), num_parallel_calls=AUTOTUNE)
        return ds.batch(BATCH).take(steps)

    return inputs.finish(tf.data.Dataset.range(0, 2).flat_map(one_epoch), CLASSES)


def _pack(images: Path, dest: Path) -> Path:
    """``trainjob dataset pack`` of the images (the default split), shards of ~4 MB."""
    subprocess.run([sys.executable, "-m", "trainjob.cli", "dataset", "pack", str(images),
                    str(dest), "--shard-size", "4MB", "--processes", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    return dest


def _packed_stream(folder: Path, work_dir: Path) -> Callable:
    """The packed path's training stream, as a one-worker run builds it (``streams.build``
    on ``source.load_packed``)."""
    from trainjob.config import Config
    from trainjob.data import source
    from trainjob.data.packed import packed_store
    from trainjob.train import streams

    cfg = Config.from_options(data=str(folder), output=str(work_dir / "unused"),
                              work_dir=str(work_dir), image_size=SIZE, batch_size=BATCH,
                              seed=SEED)
    data = source.load_packed(packed_store(str(folder)), {})
    return streams.build(cfg, data, 1, None).train


def _warm(tf, paths: list[str]) -> None:
    """Every file in the page cache, and TensorFlow's first-call costs paid, before timing."""
    for _ in tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file).batch(256):
        pass


def _machine(tf, keras) -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:  # one contender, for main
        print("ONE " + json.dumps(one(sys.argv[2], sys.argv[3] == "per_core", Path(sys.argv[4]))))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS)
