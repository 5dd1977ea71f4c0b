"""``trainjob runs compare``: a sweep's run folders side by side, on moto_server (s3://)
and on a local folder, through the real CLI; nothing mocked.

The folders are written by hand as a sweep's trials leave them: config.json with the
trial's settings, history.json, metrics.json for the finished ones, a status.json.
The subprocess checks of which modules the command imports are in test_runs.py.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from helpers import runfolders

from trainjob.cli import cli, main
from trainjob.inspect import runcompare
from trainjob.store.s3 import S3Store
from trainjob.store.uri import open_store


def settings(lr: float, freeze: int, index: int) -> dict:
    """config.json's settings of trial ``index`` of a sweep over lr x freeze."""
    return {"data": {"data": "s3://datasets/caltech-101.zip", "cache_dir": f"/c{index}"},
            "optim": {"epochs": 4, "learning_rate": lr, "freeze_backbone_epochs": freeze,
                      "optimizer": "adam"},
            "output": {"output": f"s3://runs/sweep/trial-{index:03d}"},
            "sweep": {"sweep_file": "/etc/trainjob/sweep/sweep.json", "trial_index": index}}


def history(val_acc: list, val_loss: list) -> list[dict]:
    return [{"epoch": e, "accuracy": 0.5, "loss": 1.0, "val_accuracy": a, "val_loss": v,
             "lr": 3e-4} for e, (a, v) in enumerate(zip(val_acc, val_loss))]


# (lr, freeze, val_accuracy per epoch, val_loss per epoch, test accuracy or None: unfinished)
TRIALS = {
    "trial-000": (0.001, 0, [0.2, 0.5, 0.4, 0.45], [2.0, 1.2, 1.4, 1.3], 0.41),
    "trial-001": (0.001, 5, [0.3, 0.6, 0.62, 0.55], [1.9, 1.0, 0.9, 1.1], 0.58),
    "trial-002": (0.0003, 0, [0.1, None, 0.35], [2.2, None, 1.5], None),  # running, epoch 3
}


def write_sweep(put, now: float) -> None:
    """The trials through ``put(key, obj)``, and a folder that holds no run."""
    for i, (name, (lr, freeze, acc, loss, test)) in enumerate(TRIALS.items()):
        put(f"{name}/config.json", {"settings": settings(lr, freeze, i)})
        put(f"{name}/history.json", history(acc, loss))
        done = test is not None
        put(f"{name}/status.json", {"state": "succeeded" if done else "running",
                                    "started": now - 600, "epochs_done": len(acc),
                                    **({"finished": now - 60} if done else {})})
        if done:
            put(f"{name}/metrics.json", {"accuracy": test, "loss": 1.2})
            put(f"{name}/manifest.json", {"files": {}})
        else:
            put(f"{name}/run.lock.json", {"token": "t", "host": "node-1", "pid": 7,
                                          "started": now - 600, "heartbeat": now - 5})
    put("notes/readme.json", {"not": "a run"})


@pytest.fixture
def sweep_bucket(s3env, s3, bucket) -> str:
    client = s3.client()
    write_sweep(lambda key, obj: runfolders.put_json(client, bucket, f"sweeps/lr/{key}", obj),
                time.time())
    return bucket


@pytest.fixture
def sweep_folder(tmp_path):
    root = tmp_path / "sweeps" / "lr"

    def put(key: str, obj) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(json.dumps(obj))

    write_sweep(put, time.time())
    return root


def test_rows_best_first_with_only_the_settings_that_differ(sweep_bucket):
    rows = runcompare.compare_runs(S3Store(sweep_bucket, "sweeps/lr", threads=4), threads=4)
    assert [r.name for r in rows] == ["trial-001", "trial-000", "trial-002"]  # notes/: no run
    best = rows[0]
    # Differ: the two swept settings; not the output, the trial index or the cache folder.
    assert best.settings == {"optim.learning_rate": 0.001, "optim.freeze_backbone_epochs": 5}
    assert (best.best_val_accuracy, best.final_val_accuracy) == (0.62, 0.55)
    assert (best.best_val_loss, best.final_val_loss) == (0.9, 1.1)
    assert (best.test_accuracy, best.status, best.epochs_done, best.epochs_planned) == \
        (0.58, "succeeded", 4, 4)
    running = rows[2]
    assert (running.status, running.final_val_accuracy, running.test_accuracy) == \
        ("running", 0.35, None)  # the last epoch with validation; no test yet
    assert running.uri == f"s3://{sweep_bucket}/sweeps/lr/trial-002"


def test_sort_direction_follows_the_metric(sweep_bucket):
    store = S3Store(sweep_bucket, "sweeps/lr", threads=4)
    by_loss = runcompare.compare_runs(store, 4, "final_val_loss")  # lowest first
    assert [r.name for r in by_loss] == ["trial-001", "trial-000", "trial-002"]
    assert [r.final_val_loss for r in by_loss] == [1.1, 1.3, 1.5]
    by_test = runcompare.compare_runs(store, 4, "test_accuracy")  # highest first, None last
    assert [r.name for r in by_test] == ["trial-001", "trial-000", "trial-002"]
    by_best_loss = runcompare.compare_runs(store, 4, "best_val_loss")
    assert [r.best_val_loss for r in by_best_loss] == [0.9, 1.2, 1.5]


def test_table_and_json_on_an_s3_prefix(sweep_bucket):
    result = CliRunner().invoke(cli, ["runs", "compare", f"s3://{sweep_bucket}/sweeps/lr/"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "EPOCHS", "LEARNING_RATE",
                                "FREEZE_BACKBONE_EPOCHS", "BEST", "VAL_ACC", "*", "FINAL",
                                "VAL_ACC", "BEST", "VAL_LOSS", "FINAL", "VAL_LOSS", "TEST",
                                "ACC"]
    assert lines[1].split() == ["trial-001", "succeeded", "4/4", "0.0010", "5", "0.6200",
                                "0.5500", "0.9000", "1.1000", "0.5800"]
    assert lines[3].split()[:3] == ["trial-002", "running", "3/4"]
    assert lines[3].split()[-1] == "-"
    assert "sorted by best_val_accuracy, highest first" in result.stdout
    as_json = CliRunner().invoke(cli, ["runs", "compare", "--json", "--sort", "final_val_loss",
                                       f"s3://{sweep_bucket}/sweeps/lr"])
    rows = json.loads(as_json.stdout)
    assert [r["name"] for r in rows] == ["trial-001", "trial-000", "trial-002"]
    assert rows[1]["settings"] == {"optim.learning_rate": 0.001,
                                   "optim.freeze_backbone_epochs": 0}
    assert "curves" not in rows[0] and rows[0]["test_accuracy"] == 0.58


def test_plot_draws_the_validation_curves(sweep_folder, tmp_path):
    out = tmp_path / "pictures" / "curves.png"
    result = CliRunner().invoke(cli, ["runs", "compare", str(sweep_folder), "--plot", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "validation curves of 3 runs written to" in result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    with Image.open(out) as image:
        width, height = image.size
        assert width > 2 * height * 0.9  # two panels side by side
        # Every run's line is drawn in its own colour (matplotlib's first three).
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert rgb in colours, rgb


def test_the_same_settings_everywhere_give_no_setting_columns(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"settings": settings(
            0.1, 0, 0) | {"output": {"output": f"s3://x/{name}"}}}))
        (tmp_path / name / "status.json").write_text('{"state": "failed"}')
    rows = runcompare.compare_runs(open_store(str(tmp_path), 2), 2)
    assert [r.settings for r in rows] == [{}, {}]
    assert "the runs' settings do not differ" in runcompare.render(rows)


def test_a_prefix_without_runs_is_exit_2_in_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    assert main(["runs", "compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run folders under" in err and "Traceback" not in err
    assert main(["runs", "compare", "--sort", "accuracy", str(tmp_path)]) == 2
    assert "Invalid value for '--sort'" in capsys.readouterr().err
