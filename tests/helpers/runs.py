"""Run folders and save points made by hand, without TensorFlow."""

from __future__ import annotations

import os
from pathlib import Path

from trainjob.config import Config
from trainjob.run import stop
from trainjob.run.folder import (
    LOG_CSV,
    RunFolder,
)
from trainjob.run.state import RunState


def cfg_for(output: str, tmp_path: Path, **options) -> Config:
    return Config.from_options(data=str(tmp_path / "no-data"), output=output,
                               work_dir=str(tmp_path / "work"), **options)


def started_run(run: RunFolder, epochs: int, fingerprint: dict | None = None) -> None:
    """A run that trained ``epochs`` epochs: logs, checkpoints and save points."""
    state = RunState(run, fingerprint=fingerprint or {}, history=[], stop=stop.StopSignal())
    for epoch in range(epochs):
        run.path(LOG_CSV).write_text("epoch,loss\n" + "".join(f"{e},1.0\n" for e in range(epoch + 1)))
        run.path("checkpoints").mkdir(exist_ok=True)
        run.path("checkpoints/best.weights.h5").write_bytes(b"best")
        state.end_epoch(epoch, {"epoch": epoch},
                        write_weights=lambda p, e=epoch: p.write_bytes(f"w{e}".encode() * 100),
                        iterations=epoch, callbacks={})
    assert run.uploader.flush(timeout=10)


def weights_writer(tag: str):
    def write(path: Path) -> None:
        path.write_bytes(tag.encode() + os.urandom(4096))
    return write
