"""The run folder's pictures of the test split: the confusion matrix and per-class accuracy.

Drawn with matplotlib's Agg backend (no display); sized by the class count so that every
class name stays readable at Caltech101's 101 classes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from trainjob.inspect.pictures import pyplot
from trainjob.run.folder import CONFUSION, PER_CLASS

log = logging.getLogger(__name__)

INCH_PER_CLASS = 0.2  # one row of text at LABEL_POINTS, with a little air
LABEL_POINTS = 7  # at 40 classes or more; 9 below
DPI = 100


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: rows are the true class, columns the predicted one."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, int), np.asarray(predicted, int)), 1)
    return matrix


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the fraction of a true class predicted as each class);
    rows of classes absent from the test split stay zero."""
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def label_points(n: int) -> int:
    return LABEL_POINTS if n >= 40 else 9


def plot_confusion(matrix: np.ndarray, classes: list[str], out: Path) -> None:
    """The row-normalized confusion matrix, every class named on both axes."""
    plt = pyplot()
    n = len(classes)
    side = max(6.0, INCH_PER_CLASS * n + 3.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(normalize_rows(matrix), cmap="Blues", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=label_points(n))
    ax.set_yticks(range(n), classes, fontsize=label_points(n))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix of the test split ({int(matrix.sum())} images), "
                 "each row normalized")
    if n > 1:  # a faint grid between cells, so a row can be followed across the picture
        ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="0.9", linewidth=0.3)
        ax.tick_params(which="minor", length=0)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def plot_per_class(per_class: dict[str, float], out: Path) -> None:
    """Per-class test accuracy as horizontal bars, lowest first (at the top), with the mean."""
    plt = pyplot()
    ranked = sorted(per_class.items(), key=lambda nv: (nv[1], nv[0]))
    names = [name for name, _ in ranked]
    values = [value for _, value in ranked]
    n = len(ranked)
    fig, ax = plt.subplots(figsize=(9.0, max(3.0, INCH_PER_CLASS * n + 1.5)))
    ax.barh(range(n), values, color="tab:blue")
    ax.set_yticks(range(n), names, fontsize=label_points(n))
    ax.set_ylim(n - 0.5, -0.5)  # lowest accuracy at the top
    for y, value in enumerate(values):
        ax.text(min(value, 1.0) + 0.01, y, f"{value:.2f}", va="center",
                fontsize=label_points(n))
    mean = float(np.mean(values)) if values else 0.0
    # The mean is named in the title, not a legend: a legend would cover bars somewhere.
    ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlim(0.0, 1.1)
    ax.set_xlabel("test accuracy")
    ax.set_title(f"Per-class test accuracy ({n} classes), sorted; dashed: the mean per-class "
                 f"accuracy, {mean:.3f}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def plot_test_split(metrics: dict, classes: list[str], run: Path) -> None:
    """confusion.png and per_class.png in the run folder ``run``, from
    ``training.evaluate``'s metrics; neither for an empty test split."""
    if not metrics.get("confusion_matrix"):
        log.info("the test split is empty: no %s or %s", CONFUSION, PER_CLASS)
        return
    plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, run / CONFUSION)
    plot_per_class(metrics["per_class_accuracy"], run / PER_CLASS)


def plot_history(history: list[dict[str, Any]], out: Path) -> None:
    """Loss and accuracy curves, train and validation."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            points = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
