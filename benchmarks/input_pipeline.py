"""Input pipeline throughput: trainjob's tf.data pipeline against Keras' legacy
ImageDataGenerator.flow_from_directory (what the reference script used), side by side.

Same images, batch size, target size and augmentation (horizontal flip, zoom up to 20%).
Two passes each: the first decodes every file, the second is where tf.data's cache pays.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sampledata  # noqa: E402

SIZE, BATCH = 128, 32


def main() -> dict:
    import tensorflow as tf

    from trainjob.data.catalog import scan
    from trainjob.train import inputs

    work = Path(tempfile.mkdtemp(prefix="bench-pipe-"))
    root = work / "101_ObjectCategories"
    sampledata.make_class_folders(root, classes=10, per_class=60, size=(240, 300),
                                  background=False)
    catalog = scan(root, work / "converted")
    n = len(catalog.samples)
    steps = -(-n // BATCH)

    base = inputs.decoded(catalog.samples, SIZE, "memory", work, "bench")
    stream = inputs.training_stream(base, n, len(catalog.classes), image_size=SIZE,
                                    batch_size=BATCH, steps=steps, repeat=False, shuffle=True,
                                    augment=True, seed=1, first_epoch=0, epochs=2)
    it = iter(stream)
    tfdata = []
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        tfdata.append(n / (time.perf_counter() - start))

    gen = tf.keras.preprocessing.image.ImageDataGenerator(horizontal_flip=True, zoom_range=0.2)
    flow = gen.flow_from_directory(str(root), target_size=(SIZE, SIZE), batch_size=BATCH,
                                   class_mode="categorical", seed=1)
    legacy = []
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(len(flow)):
            next(flow)
        legacy.append(n / (time.perf_counter() - start))

    result = {"images": n, "image_size": SIZE, "batch_size": BATCH,
              "tf_data_images_per_s": [round(x, 1) for x in tfdata],
              "image_data_generator_images_per_s": [round(x, 1) for x in legacy],
              "speedup_pass1": round(tfdata[0] / legacy[0], 2),
              "speedup_pass2": round(tfdata[1] / legacy[1], 2)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
