"""``trainjob predict`` on a tiny model made in-process (the 2-epoch ResNet50 run's model is
predicted in test_resume.py): class names, probabilities, images of any size and mode,
a corrupt image, s3:// models and prefixes on moto_server, and the evaluation path's top-1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainjob.cli import main
from trainjob.run.folder import write_json
from trainjob.train import predictor

SIZE = 16
NAMES = ["red", "green", "blue"]
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder with a model that answers the dominant colour, and its classes.json."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("predictions").set_weights([np.eye(3, dtype="float32") * 8,
                                                np.zeros(3, "float32")])
    run = tmp_path_factory.mktemp("run")
    (run / "model").mkdir()
    model.save(run / "model" / "model.keras")
    write_json(run / "classes.json", {str(i): n for i, n in enumerate(NAMES)})
    return run


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """Each class in another size and mode (RGB PNG, CMYK JPEG, palette GIF), a grayscale
    JPEG, and a corrupt file."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = {"red": folder / "red.png", "green": folder / "green.gif",
             "blue": folder / "blue.jpg", "gray": folder / "gray.jpg",
             "corrupt": folder / "corrupt.jpg"}
    Image.new("RGB", (40, 30), COLOURS["red"]).save(paths["red"])
    Image.new("RGB", (9, 77), COLOURS["green"]).convert("P").save(paths["green"])
    Image.new("CMYK", (300, 200), (235, 235, 0, 0)).save(paths["blue"], "JPEG")
    Image.new("L", (20, 20), 128).save(paths["gray"])
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    return paths


def predict_json(capsys, *args: str) -> tuple[int, list[dict], list[str]]:
    rc = main(["predict", *args, "--json"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("trainjob")]
    return rc, json.loads(out), lines


def test_predicts_every_good_image_and_reports_the_corrupt_one(run_folder, images, tmp_path,
                                                               capsys):
    order = ["red", "corrupt", "green", "blue"]
    rc, results, errors = predict_json(
        capsys, "--model", str(run_folder), *[str(images[k]) for k in order], "--top-k", "3",
        "--work-dir", str(tmp_path / "work"))
    assert rc == 3  # a data error: some images failed
    assert [r["image"] for r in results] == [str(images[k]) for k in order]
    by_name = dict(zip(order, results))
    for name in ("red", "green", "blue"):
        top = by_name[name]["top"]
        assert top and top[0]["class"] == name and by_name[name]["error"] is None
        probabilities = [c["probability"] for c in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert {c["class"] for c in top} == set(NAMES)  # classes.json's names
        assert sum(c["probability"] for c in top) == pytest.approx(1.0, abs=1e-5)
    assert by_name["corrupt"]["top"] == [] and "unreadable image" in by_name["corrupt"]["error"]
    assert len(errors) == 2, errors  # the image's own line, then the summary
    assert errors[0].startswith(f"trainjob: {images['corrupt']}: unreadable image")
    assert errors[1].startswith("trainjob: error: 1 of 4 images could not be predicted")


def test_a_keras_file_in_a_run_folder_and_a_local_folder_of_images(run_folder, images, tmp_path,
                                                                   capsys):
    images["corrupt"].unlink()
    rc = main(["predict", "--model", str(run_folder / "model" / "model.keras"),
               str(images["red"].parent), "--top-k", "1", "--work-dir", str(tmp_path / "w")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # Sorted by name: blue, gray, green, red; each block names the image, then its class.
    blocks = out.strip().split("\n\n")
    assert [b.splitlines()[0].rsplit("/", 1)[1] for b in blocks] == \
        ["blue.jpg", "gray.jpg", "green.gif", "red.png"]
    assert [b.splitlines()[1].split()[0] for b in blocks if "gray" not in b] == \
        ["blue", "green", "red"]


def test_a_keras_file_alone_names_classes_by_index(run_folder, images, tmp_path, capsys):
    alone = tmp_path / "elsewhere.keras"
    alone.write_bytes((run_folder / "model" / "model.keras").read_bytes())
    rc, results, _ = predict_json(capsys, "--model", str(alone), str(images["blue"]),
                                  "--work-dir", str(tmp_path / "w"))
    assert rc == 0 and results[0]["top"][0]["class"] == "2"


def test_s3_model_and_s3_prefix(s3env, s3, bucket, run_folder, images, tmp_path, capsys):
    client = s3.client()
    for path in run_folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/r1/{path.relative_to(run_folder)}")
    for name in ("red", "blue", "corrupt"):
        client.upload_file(str(images[name]), bucket, f"incoming/{images[name].name}")
    # A prefix named without its slash, then one object of it by name.
    rc, results, errors = predict_json(capsys, "--model", f"s3://{bucket}/runs/r1",
                                       f"s3://{bucket}/incoming", f"s3://{bucket}/incoming/red.png",
                                       "--work-dir", str(tmp_path / "w"))
    assert rc == 3
    assert [r["image"] for r in results] == [f"s3://{bucket}/incoming/{n}" for n in (
        "blue.jpg", "corrupt.jpg", "red.png", "red.png")]
    got = {r["image"].rsplit("/", 1)[1]: r for r in results}
    assert got["blue.jpg"]["top"][0]["class"] == "blue"
    assert got["red.png"]["top"][0]["class"] == "red"
    assert got["corrupt.jpg"]["error"] and errors[0].endswith(got["corrupt.jpg"]["error"])
    assert not list((tmp_path / "w").iterdir())  # downloads are temporary


def test_no_classes_json_in_a_run_folder_is_a_usage_error(tmp_path, images, capsys):
    (tmp_path / "run").mkdir()
    rc = main(["predict", "--model", str(tmp_path / "run"), str(images["red"])])
    assert rc == 2 and "classes.json is missing" in capsys.readouterr().err


def test_top1_equals_the_evaluation_path(run_folder, images):
    """The pipeline evaluation uses (inputs.decoded + evaluation_stream) gives the same
    probabilities as predict, on the same files."""
    import keras

    from trainjob.data.catalog import Sample
    from trainjob.train import inputs

    files = [images[k] for k in ("red", "green", "gray")]
    model = keras.saving.load_model(run_folder / "model" / "model.keras")
    stream = inputs.evaluation_stream(
        inputs.decoded([Sample(str(p), 0) for p in files], SIZE, "none", Path("/nonexistent"),
                       "test"), 3, 2)
    evaluated = model.predict(stream, verbose=0)
    results = predictor.predict(str(run_folder), [str(p) for p in files], top_k=3,
                                work_dir=Path(images["red"].parent / "w"))
    for row, result in zip(evaluated, results):
        assert result.top[0]["index"] == int(np.argmax(row))
        got = {c["index"]: c["probability"] for c in result.top}
        assert [got[i] for i in range(3)] == pytest.approx(row.tolist(), abs=1e-6)
