"""The run's ``config.json``: the settings as given, the versions, the hardware, the
dataset, how the run is spread over workers, and the time each step took."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from trainjob import __version__
from trainjob.config import Config
from trainjob.run.cluster import Cluster
from trainjob.run.folder import CONFIG, RunFolder
from trainjob.store.client import redact


def distribution(cfg: Config, group: Cluster | None, replicas: int) -> dict:
    """How the run is spread, and the learning rate that follows from it."""
    return {"workers": group.size if group else 1, "replicas": replicas,
            "cluster": group.describe() if group else None, "lr_scaling": cfg.optim.lr_scaling,
            "global_batch_size": cfg.optim.batch_size, "learning_rate": cfg.optim.learning_rate}


@dataclass
class RunRecord:
    """What config.json says, written again as the run goes: the settings as given, the
    dataset, where the run resumed, how it is spread (once the strategy is known), and the
    time each step took (``timed``). ``fingerprint`` (``savepoints.fingerprint``) lets a
    resume from the last checkpoint alone check the settings when no record is left."""

    run_dir: RunFolder
    settings: Config
    state: dict | None = None
    dataset: dict = field(default_factory=dict)
    fingerprint: dict | None = None
    distribution: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time spent inside to ``phase``."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - start

    def write(self) -> None:
        """Write config.json now."""
        cfg = self.settings
        self.run_dir.write(CONFIG, {
            "settings": _without_secrets(cfg.to_dict()),
            "fingerprint": self.fingerprint,
            "versions": versions(),
            "hardware": {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "gpus": gpu_names()},
            "dataset": self.dataset,
            "timings_seconds": {k: round(v, 2) for k, v in self.timings.items()},
            "resumed_from_epoch": self.state["epoch"] if self.state else None,
            "distribution": self.distribution,
            # The sweep trial this run is (--sweep-file): its index and the settings it set.
            "trial": cfg.trial.to_dict() if cfg.trial else None,
        })


def versions() -> dict[str, str]:
    out = {"trainjob": __version__, "python": sys.version.split()[0]}
    for name in ("tensorflow", "keras", "numpy", "boto3"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def gpu_names() -> list[str]:
    tf = sys.modules.get("tensorflow")
    return [d.name for d in tf.config.list_physical_devices("GPU")] if tf else []


def _without_secrets(settings: dict) -> dict:
    """The settings, the tracking server's URI without credentials or query secrets."""
    tracking = dict(settings.get("tracking", {}))
    if tracking.get("mlflow_tracking_uri"):
        tracking["mlflow_tracking_uri"] = redact(tracking["mlflow_tracking_uri"])
    return {**settings, "tracking": tracking} if tracking else settings
