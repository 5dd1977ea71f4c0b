"""``trainjob runs compare``: the run folders under one prefix side by side.

Built on runinfo's readers (every run's small JSON files in one thread pool): the settings
that differ between the runs, validation accuracy and loss (best and final), the test
accuracy, epochs and state, sorted by one metric. The picture of the validation curves
(matplotlib, Agg) is drawn only on request, so the command never imports matplotlib
otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainjob.errors import ConfigError
from trainjob.inspect import runinfo, textfmt
from trainjob.run.folder import CONFIG, HISTORY, LOCK, MANIFEST, METRICS, STATUS
from trainjob.store.base import Store

log = logging.getLogger(__name__)

# Metric -> whether higher is better: the sort direction of --sort.
SORTS = {"best_val_accuracy": True, "final_val_accuracy": True, "test_accuracy": True,
         "best_val_loss": False, "final_val_loss": False}
DEFAULT_SORT = "best_val_accuracy"
# Where a run is, not what it trained: never a difference worth a column.
NOT_SETTINGS = {"output.output", "sweep.trial_index", "sweep.sweep_file", "data.cache_dir",
                "runtime.work_dir"}


@dataclass(frozen=True)
class Comparison:
    """One row of ``trainjob runs compare``."""

    name: str
    uri: str
    status: str
    finished: bool
    epochs_done: int | None
    epochs_planned: int | None
    best_val_accuracy: float | None
    final_val_accuracy: float | None
    best_val_loss: float | None
    final_val_loss: float | None
    test_accuracy: float | None
    settings: dict[str, Any] = field(default_factory=dict)  # only those that differ
    curves: dict[str, list] = field(default_factory=dict, repr=False)  # epoch, val_* lists

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("curves")
        return out


def compare_runs(store: Store, threads: int = 16, sort: str = DEFAULT_SORT,
                 now: float | None = None) -> list[Comparison]:
    """One row per run folder under ``store``, best first by ``sort``."""
    if sort not in SORTS:
        raise ConfigError(f"--sort {sort}: use one of {', '.join(SORTS)}")
    runs = runinfo.find_runs(store)
    files = runinfo.read_files(store, runs, threads)
    found = {run: got for run, got in files.items()
             if any(got.get(name) for name in (STATUS, LOCK, MANIFEST, CONFIG))}
    if not found:
        raise ConfigError(f"no run folders under {store.uri}: give the prefix that holds them "
                          "(a sweep's TRAINJOB_OUTPUT, e.g. s3://bucket/sweeps/exp1/)")
    settings = {run: flat_settings(got.get(CONFIG)) for run, got in found.items()}
    differing = differing_keys(list(settings.values()))
    rows = [row(run, store.child(run), got, {k: settings[run].get(k) for k in differing}, now)
            for run, got in found.items()]
    return sort_rows(rows, sort)


def flat_settings(config: Any) -> dict[str, Any]:
    """config.json's settings as {"group.name": value}."""
    groups = config.get("settings") if isinstance(config, dict) else None
    if not isinstance(groups, dict):
        return {}
    return {f"{group}.{name}": value for group, values in groups.items()
            if isinstance(values, dict) for name, value in values.items()}


def differing_keys(settings: list[dict[str, Any]]) -> list[str]:
    """The settings whose values are not all equal across the runs (missing = None), in
    config.json's order."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if k not in NOT_SETTINGS
            and len({repr(s.get(k)) for s in settings}) > 1]


def row(name: str, uri: str, files: dict[str, Any], settings: dict[str, Any],
        now: float | None = None) -> Comparison:
    """The comparison row of one run from its files (runinfo.read_files)."""
    summary = runinfo.summarize(name, uri, files, now)
    history = files.get(HISTORY) if isinstance(files.get(HISTORY), list) else []
    history = [h for h in history if isinstance(h, dict)]
    acc, loss = series(history, "val_accuracy"), series(history, "val_loss")
    metrics = files.get(METRICS) if isinstance(files.get(METRICS), dict) else {}
    test = metrics.get("accuracy")
    return Comparison(
        name=name, uri=uri, status=summary.status, finished=summary.finished,
        epochs_done=summary.epochs_done, epochs_planned=summary.epochs_planned,
        best_val_accuracy=max(acc) if acc else None,
        final_val_accuracy=acc[-1] if acc else None,
        best_val_loss=min(loss) if loss else None,
        final_val_loss=loss[-1] if loss else None,
        test_accuracy=float(test) if isinstance(test, (int, float)) else None,
        settings=settings,
        curves={"epoch": [h.get("epoch", i) for i, h in enumerate(history)],
                "val_accuracy": [number(h.get("val_accuracy")) for h in history],
                "val_loss": [number(h.get("val_loss")) for h in history]})


def series(history: list[dict], key: str) -> list[float]:
    """The known values of ``key`` (epochs without validation have none)."""
    return [v for v in (number(h.get(key)) for h in history) if v is not None]


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def sort_rows(rows: list[Comparison], sort: str) -> list[Comparison]:
    """Best first by ``sort`` (higher or lower is better by the metric); runs without the
    metric last; ties by name."""
    sign = -1.0 if SORTS[sort] else 1.0

    def key(r: Comparison) -> tuple:
        value = getattr(r, sort)
        return (value is None, sign * value if value is not None else 0.0, r.name)

    return sorted(rows, key=key)


def render(rows: list[Comparison], sort: str = DEFAULT_SORT) -> str:
    """The text table: run, state, epochs, the differing settings, the metrics."""
    keys = list(dict.fromkeys(k for r in rows for k in r.settings))
    labels = setting_labels(keys)
    metrics = ["best_val_accuracy", "final_val_accuracy", "best_val_loss", "final_val_loss",
               "test_accuracy"]
    titles = {"best_val_accuracy": "BEST VAL_ACC", "final_val_accuracy": "FINAL VAL_ACC",
              "best_val_loss": "BEST VAL_LOSS", "final_val_loss": "FINAL VAL_LOSS",
              "test_accuracy": "TEST ACC"}
    headers = ["RUN", "STATUS", "EPOCHS", *[labels[k].upper() for k in keys],
               *[titles[m] + (" *" if m == sort else "") for m in metrics]]
    body = [[r.name, r.status, f"{dash(r.epochs_done)}/{dash(r.epochs_planned)}",
             *[r.settings.get(k) for k in keys], *[getattr(r, m) for m in metrics]]
            for r in rows]
    right = tuple(range(2, len(headers)))
    note = f"\n\n* sorted by {sort}, {'highest' if SORTS[sort] else 'lowest'} first"
    if not keys:
        note += "; the runs' settings do not differ"
    return textfmt.table(headers, body, right=right) + note


def setting_labels(keys: list[str]) -> dict[str, str]:
    """Column names: the setting's own name, with its group where two groups share it."""
    names = [k.split(".", 1)[-1] for k in keys]
    return {k: (n if names.count(n) == 1 else k) for k, n in zip(keys, names)}


def dash(value: object) -> str:
    return textfmt.MISSING if value is None else str(value)


def plot_curves(rows: list[Comparison], out: Path) -> None:
    """val_accuracy and val_loss per epoch, one line per run, side by side, into ``out``
    (the format from its suffix: .png, .svg, .pdf)."""
    from trainjob.inspect.pictures import pyplot  # matplotlib only when a picture is asked for

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "val_accuracy", "validation accuracy"),
                           (axes[1], "val_loss", "validation loss")):
        for r in rows:
            points = [(e, v) for e, v in zip(r.curves.get("epoch", []), r.curves.get(key, []))
                      if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=r.name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))  # room for the legend
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
