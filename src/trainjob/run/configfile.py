"""The run's ``config.json``: the settings as given, the versions, the hardware, the
dataset, how the run is spread over workers, and the time each step took."""

from __future__ import annotations

import os
import platform
import sys

from trainjob import __version__
from trainjob.config import Config
from trainjob.run.cluster import Cluster
from trainjob.run.folder import CONFIG, RunFolder


def distribution(cfg: Config, group: Cluster | None, replicas: int) -> dict:
    """How the run is spread, and the learning rate that follows from it."""
    return {"workers": group.size if group else 1, "replicas": replicas,
            "cluster": group.describe() if group else None, "lr_scaling": cfg.optim.lr_scaling,
            "global_batch_size": cfg.optim.batch_size, "learning_rate": cfg.optim.learning_rate}


def write(cfg: Config, run_dir: RunFolder, dataset: dict, timings: dict,
          state: dict | None, distribution: dict | None = None,
          fingerprint: dict | None = None) -> None:
    """Write config.json (again at the end, with the timings of every step). ``fingerprint``
    (``resume.fingerprint``) lets a resume from the last checkpoint alone check the settings
    when no save point record is left."""
    run_dir.write(CONFIG, {
        "settings": cfg.to_dict(),
        "fingerprint": fingerprint,
        "versions": versions(),
        "hardware": {"platform": platform.platform(), "cpus": os.cpu_count(),
                     "gpus": gpu_names()},
        "dataset": dataset,
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "resumed_from_epoch": state["epoch"] if state else None,
        "distribution": distribution,
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
