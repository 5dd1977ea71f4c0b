"""The run's settings: frozen dataclasses, one per option group.

Each field is declared once, with its help text and group; the CLI builds its click options
from these declarations, so the option list, the ``TRAINJOB_*`` variables, the ConfigMap
test and ``config.json`` can never drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainjob.data.stream import parse_buffer
from trainjob.errors import ConfigError
from trainjob.store.uri import parse_uri

GiB = 1024**3


def _default_home() -> str:
    # One writable root for everything the job keeps locally, so a container can run with a
    # read-only root filesystem and a single volume (TRAINJOB_HOME) for cache and work.
    return os.environ.get("TRAINJOB_HOME") or str(Path.home() / ".cache" / "trainjob")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           type: Any = None, required: bool = False) -> Any:
    """Declare a setting: its default and how the CLI presents it."""
    meta = {"help": help, "choices": choices, "type": type, "required": required}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    data: str = option(None, "Dataset URI: s3://bucket/archive.zip, s3://bucket/prefix/, "
                       "or a local archive or folder of class folders.", required=True)
    include_background: bool = option(False, "Keep Caltech101's BACKGROUND_Google class.")
    cache_dir: str = option(lambda: str(Path(_default_home()) / "cache"),
                            "Download and extraction cache (keyed by key + ETag + size).")
    max_extract_bytes: int = option(32 * GiB, "Refuse archives that unpack to more bytes.")
    max_bad_fraction: float = option(0.05, "Fail when more than this fraction of files "
                                     "are unreadable images.")
    pipeline_cache: str = option("auto", "Cache the training files' bytes and the decoded, "
                                 "resized validation images: in memory, in a file under the "
                                 "work dir, or not at all; auto: in memory when they fit in "
                                 "40% of the RAM (or of the container's memory limit), else "
                                 "in a file.",
                                 choices=("auto", "memory", "file", "none"))
    stream_buffer: str = option("10", "A packed dataset's local buffer: a number of shards "
                                "(10) or a size (2GB, 1.5GiB), at least 7 shards; local disk "
                                "never holds more of the dataset.")

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("--data is required: give s3://bucket/key or a local path")
        parse_uri(self.data)  # an unknown scheme is a usage error, found before any I/O
        _check_range("--max-bad-fraction", self.max_bad_fraction, 0.0, 1.0)
        if self.max_extract_bytes <= 0:
            raise ConfigError("--max-extract-bytes must be positive")
        parse_buffer(self.stream_buffer)


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = option(0.15, "Fraction of each class for validation.")
    test_fraction: float = option(0.15, "Fraction of each class for the held-out test.")
    train_per_class: int | None = option(None, "Caltech101 protocol: N training images per "
                                         "class, the rest split between validation and "
                                         "test. Overrides the fractions.", type=int)
    seed: int = option(42, "Seed for the split, shuffling and augmentation.")

    def __post_init__(self) -> None:
        _check_range("--val-fraction", self.val_fraction, 0.0, 1.0)
        _check_range("--test-fraction", self.test_fraction, 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"--val-fraction + --test-fraction is {self.val_fraction + self.test_fraction:g}; "
                "it must stay below 1 so that training data is left")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ConfigError("--train-per-class must be at least 1")


@dataclass(frozen=True)
class ModelConfig:
    weights: str = option("none", "Initial weights: none; imagenet (Keras' download, "
                          "cached under KERAS_HOME); or a URI or path of a trainjob "
                          ".weights.h5 or of Keras' ResNet50 no-top .h5 (backbone only), "
                          "told apart by their contents.")
    image_size: int = option(224, "Images are resized to SIZE x SIZE.")
    precision: str = option("auto", "auto is mixed_float16 on a GPU, float32 on a CPU.",
                            choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    jit_compile: str = option("auto", "XLA compilation; auto is on for GPUs only.",
                              choices=("auto", "on", "off"))

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ConfigError(f"--image-size {self.image_size} is too small: ResNet50 needs 32+")
        if not self.weights:
            raise ConfigError("--weights is empty: use none, imagenet, or a URI of a weights "
                              "file")
        if self.weights not in ("none", "imagenet"):
            parse_uri(self.weights)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = option(50, "Number of epochs.")
    batch_size: int = option(32, "Images per batch (global, across replicas).")
    optimizer: str = option("adam", "Optimizer.", choices=("adam", "sgd"))
    learning_rate: float = option(3e-4, "Initial learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy.")
    lr_schedule: str = option("none", "exp-decay keeps the rate until epoch 10, then "
                              "lr * exp(0.1 * (10 - epoch)); it replaces ReduceLROnPlateau.",
                              choices=("none", "exp-decay"))
    class_weight: str = option("none", "balanced weighs classes by inverse frequency.",
                               choices=("none", "balanced"))
    steps_per_epoch: int | None = option(None, "Batches per epoch (default: one pass).",
                                         type=int)
    validation_freq: int = option(1, "Validate every N epochs.")
    shuffle: bool = option(True, "Shuffle the training data every epoch.")
    augment: bool = option(True, "Each epoch, train on a random window of 80-100% of each "
                           "side of every image, flipped half the time, resized once "
                           "(bilinear); drawn from --seed, the epoch and the image.")
    freeze_backbone_epochs: int = option(0, "Fine-tuning: train only the classifier head "
                                         "for the first N epochs (backbone frozen, its "
                                         "BatchNorm in inference mode), then everything.")
    fine_tune_learning_rate: float | None = option(
        None, "Learning rate once the backbone is unfrozen (default: a tenth of "
        "--learning-rate).", type=float)
    lr_scaling: str = option("none", "Several replicas: linear multiplies the learning "
                             "rates by the number of replicas (the global batch grows with "
                             "them); none keeps them.", choices=("none", "linear"))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "validation_freq"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.learning_rate <= 0:
            raise ConfigError("--learning-rate must be positive")
        if self.freeze_backbone_epochs < 0:
            raise ConfigError("--freeze-backbone-epochs must be 0 or more")
        if self.fine_tune_learning_rate is not None and self.fine_tune_learning_rate <= 0:
            raise ConfigError("--fine-tune-learning-rate must be positive")
        _check_range("--label-smoothing", self.label_smoothing, 0.0, 1.0)
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"--momentum {self.momentum:g} is out of range: use [0, 1]")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError("--steps-per-epoch must be at least 1")

    @property
    def fine_tune_rate(self) -> float:
        """The learning rate of the unfrozen phase."""
        if self.fine_tune_learning_rate is not None:
            return self.fine_tune_learning_rate
        return self.learning_rate / 10


@dataclass(frozen=True)
class CallbackConfig:
    early_stopping_patience: int = option(10, "EarlyStopping patience in epochs; 0 disables.")
    early_stopping_monitor: str = option("val_accuracy", "Metric EarlyStopping watches.")
    early_stopping_min_delta: float = option(0.0, "Smallest change that counts as better.")
    early_stopping_mode: str = option("auto", "Whether the metric should go down or up.",
                                      choices=("auto", "min", "max"))
    checkpoint_monitor: str = option("val_loss", "Metric that picks checkpoints/best.")
    checkpoint_mode: str = option("auto", "Whether the metric should go down or up.",
                                  choices=("auto", "min", "max"))
    reduce_lr: bool = option(True, "Use ReduceLROnPlateau.")
    reduce_lr_monitor: str = option("val_loss", "Metric ReduceLROnPlateau watches.")
    reduce_lr_mode: str = option("auto", "Whether the metric should go down or up.",
                                 choices=("auto", "min", "max"))
    reduce_lr_factor: float = option(0.1, "new_lr = lr * factor.")
    reduce_lr_patience: int = option(10, "Epochs without improvement before reducing.")
    reduce_lr_min_delta: float = option(1e-4, "Smallest change that counts as better.")
    reduce_lr_cooldown: int = option(0, "Epochs to wait after a reduction.")
    reduce_lr_min_lr: float = option(0.0, "Lower bound on the learning rate.")
    restore_best: bool = option(True, "Save the final model with the best checkpoint's weights.")
    recalibrate_batchnorm: bool = option(
        True, "Before the test evaluation and the export, recompute the final model's "
        "BatchNorm moving mean and variance as the average of their batch statistics over up "
        "to 4096 training images, without augmentation (one forward pass of each): the "
        "moving averages lag behind the weights, and inference uses them. Frozen BatchNorm "
        "layers are left as they are; checkpoints keep the statistics of training.")

    def __post_init__(self) -> None:
        _check_range("--reduce-lr-factor", self.reduce_lr_factor, 0.0, 1.0)
        if self.early_stopping_patience < 0 or self.reduce_lr_patience < 0:
            raise ConfigError("patience values must be 0 or more")


@dataclass(frozen=True)
class OutputConfig:
    output: str = option(None, "Run folder URI: s3://bucket/prefix or a local path.",
                         required=True)
    overwrite: bool = option(False, "Start afresh even if the run finished or can resume.")
    force: bool = option(False, "Take over the run lock at once.")
    lock_timeout: float | None = option(None, "Seconds to wait for another job's live lock "
                                        "(default: until it is stale).", type=float)
    sync: bool = option(True, "Upload the run folder in the background after each epoch.")
    backup_every_steps: int = option(0, "Also save resume state every N batches (0: epochs only).")
    upload_timeout: float = option(600.0, "At the end of the run, how long to keep retrying "
                                   "uploads to --output before failing with exit 4.")
    export: str = option("none", "Also write the final model in another format: saved_model "
                         "writes model/saved_model/ (TF Serving, SavedModel endpoints).",
                         choices=("none", "saved_model"))
    tensorboard: bool = option(False, "Write epoch scalars for TensorBoard under "
                               "tensorboard/ in the run folder, synced with each epoch.")

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("--output is required: give s3://bucket/prefix or a local path")
        parse_uri(self.output)
        if self.backup_every_steps < 0:
            raise ConfigError("--backup-every-steps must be 0 or more")
        if self.upload_timeout <= 0:
            raise ConfigError("--upload-timeout must be positive")


@dataclass(frozen=True)
class RuntimeConfig:
    work_dir: str = option(lambda: str(Path(_default_home()) / "work"),
                           "Local folder for the run folder and pipeline cache files.")
    threads: int = option(16, "Parallel S3 transfers (also sizes the connection pool).")
    grace_seconds: float = option(25.0, "On SIGTERM, finish saving and uploading within this.")
    verbose_fit: str = option("auto", "Keras output: bar on a TTY, one line per epoch "
                              "otherwise.", choices=("auto", "bar", "line"))

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError("--threads must be at least 1")


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = option(1, "Worker processes (one per node) training together; set by "
                          "the Indexed Job. TF_CONFIG, when set, takes precedence.")
    worker_hosts: str = option("{job}-{index}.{service}", "Worker address pattern: {index} "
                               "is the worker index, {job} this pod's hostname without its "
                               "index, {service} --worker-service, {port} --worker-port + "
                               "index (several workers on one host); :PORT is added when "
                               "missing.")
    worker_service: str = option("trainjob-workers", "The headless Service (the pods' "
                                 "subdomain) in the worker address pattern.")
    worker_port: int = option(2222, "Port of each worker's gRPC server.")
    cluster_timeout: float = option(600.0, "Seconds to wait for every worker to start; then "
                                    "exit 4 naming the missing ones.")
    collective_timeout: float = option(300.0, "Seconds a collective operation may wait for "
                                       "its peers (a dead or hung worker) before exit 4.")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if "{index}" not in self.worker_hosts and "{port}" not in self.worker_hosts \
                and self.workers > 1:
            raise ConfigError(f"--worker-hosts {self.worker_hosts!r} has no {{index}} or "
                              "{port} placeholder: every worker would get the same address")
        if not 0 < self.worker_port < 65536:
            raise ConfigError(f"--worker-port {self.worker_port} is not a TCP port")
        if self.cluster_timeout <= 0 or self.collective_timeout <= 0:
            raise ConfigError("--cluster-timeout and --collective-timeout must be positive")


@dataclass(frozen=True)
class SweepConfig:
    sweep_file: str | None = option(None, "A sweep: a JSON file of a grid or a list of "
                                    "trials, keyed by these settings' names (sweep_file "
                                    "aside). This job runs one trial, whose settings override "
                                    "the others, into <--output>/trial-<NNN>.", type=str)
    trial_index: int | None = option(None, "The trial of --sweep-file to run (default: "
                                     "JOB_COMPLETION_INDEX, set in each pod of an Indexed "
                                     "Job).", type=int)

    def __post_init__(self) -> None:
        if self.trial_index is not None and self.sweep_file is None:
            raise ConfigError(f"--trial-index {self.trial_index} needs --sweep-file: give the "
                              "sweep the index is a trial of")
        if self.trial_index is not None and self.trial_index < 0:
            raise ConfigError(f"--trial-index {self.trial_index} must be 0 or more")


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_tracking_uri: str | None = option(
        None, "Log the run to this MLflow tracking server (the mlflow extra): one MLflow run "
        "per run folder, continued on resume, each epoch once. MLFLOW_TRACKING_URI turns it "
        "on too.", type=str)
    mlflow_experiment: str = option("trainjob", "The MLflow experiment of the run.")

    def __post_init__(self) -> None:
        if not self.mlflow_experiment:
            raise ConfigError("--mlflow-experiment is empty: give an experiment name")


GROUPS: dict[str, type] = {
    "Data": DataConfig,
    "Split": SplitConfig,
    "Model": ModelConfig,
    "Optimization": OptimConfig,
    "Callbacks": CallbackConfig,
    "Output": OutputConfig,
    "Runtime": RuntimeConfig,
    "Cluster": ClusterConfig,
    "Sweep": SweepConfig,
    "Tracking": TrackingConfig,
}


@dataclass(frozen=True)
class Trial:
    """The trial of a sweep a run is (sweep.py): its index, the sweep's size, the file, and
    the settings it overrides, in the file's order."""

    index: int
    count: int
    source: str
    settings: tuple[tuple[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "sweep_file": self.source,
                "settings": dict(self.settings)}


@dataclass(frozen=True)
class Config:
    data: DataConfig
    split: SplitConfig
    model: ModelConfig
    optim: OptimConfig
    callbacks: CallbackConfig
    output: OutputConfig
    runtime: RuntimeConfig
    cluster: ClusterConfig
    sweep: SweepConfig
    tracking: TrackingConfig
    trial: Trial | None = None  # not an option: set by sweep.configure from --sweep-file

    @classmethod
    def from_options(cls, **options: Any) -> Config:
        """Build from flat option values (as click passes them); unknown names are errors."""
        parts = {}
        known: set[str] = set()
        for f, group in zip(_group_fields(), GROUPS.values()):
            names = {g.name for g in dataclasses.fields(group)}
            known |= names
            parts[f.name] = group(**{k: v for k, v in options.items() if k in names})
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        """The settings, group by group (config.json's "settings")."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _group_fields()}


def _group_fields() -> list[dataclasses.Field]:
    """Config's fields that hold an option group, in GROUPS' order."""
    return [f for f in dataclasses.fields(Config) if f.name != "trial"]


def option_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every setting as (group title, field), in help order."""
    return [(title, f) for title, group in GROUPS.items() for f in dataclasses.fields(group)]


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ConfigError(f"{name} {value:g} is out of range: use a value in [{low:g}, {high:g})")
