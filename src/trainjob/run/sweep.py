"""Sweeps: one trial of a JSON sweep file merged over the job's own settings.

A sweep file holds one of two things, its keys being setting names as in config.py:

- ``{"grid": {"learning_rate": [0.001, 0.0003], "freeze_backbone_epochs": [0, 5]}}``: every
  combination, numbered as nested loops over the keys in the file's order, the first key
  outermost and the last changing fastest (trial 0: 0.001/0, 1: 0.001/5, 2: 0.0003/0, ...);
- ``{"trials": [{"learning_rate": 0.001}, {"optimizer": "sgd"}]}``: the trials as listed.

Trial i (``--trial-index``, or ``JOB_COMPLETION_INDEX`` in an Indexed Job's pod) overrides
the command line and environment, and writes to ``<--output>/trial-<NNN>``. Every value of
the file is checked against its setting before anything runs, so a typo fails every trial
at once with exit 2 rather than one trial hours later.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainjob.config import ClusterConfig, Config, Trial, option_fields
from trainjob.errors import ConfigError

log = logging.getLogger(__name__)

INDEX_ENV = "JOB_COMPLETION_INDEX"  # Kubernetes sets it in every pod of an Indexed Job
# Where a trial's result goes and which trial it is are the sweep's to decide, not a trial's;
# several workers would need one Indexed Job per trial.
NOT_PER_TRIAL = {"output", "sweep_file", "trial_index"} | {
    f.name for f in dataclasses.fields(ClusterConfig)}
FIELDS = {f.name: f for _, f in option_fields()}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A checked sweep file: the grid (key -> values) or the explicit trials."""

    source: str
    grid: tuple[tuple[str, tuple[Any, ...]], ...] | None
    trials: tuple[tuple[tuple[str, Any], ...], ...] | None

    @property
    def count(self) -> int:
        if self.trials is not None:
            return len(self.trials)
        total = 1
        for _, values in self.grid or ():
            total *= len(values)
        return total

    def trial(self, index: int) -> tuple[tuple[str, Any], ...]:
        """The settings of trial ``index`` (0-based), in the file's key order."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self.trials is not None:
            return self.trials[index]
        picked = []
        for key, values in reversed(self.grid or ()):
            index, at = divmod(index, len(values))
            picked.append((key, values[at]))
        return tuple(reversed(picked))


def load(path: str) -> Sweep:
    """Read and check a sweep file; a ConfigError names the file and the entry at fault."""
    where = path
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--sweep-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--sweep-file {path}: cannot read it ({exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON at line {exc.lineno} column {exc.colno}: "
                          f"{exc.msg}") from None
    if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in ("grid", "trials"):
        keys = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{where}: a sweep file is one object with one key, \"grid\" (setting "
                          f"-> list of values) or \"trials\" (a list of objects); found {keys}")
    if "grid" in doc:
        grid = doc["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{where}: grid must be an object of setting -> list of values")
        checked = []
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: grid.{key} must be a non-empty list of values")
            check_key(key, f"{where}: grid.{key}")
            checked.append((key, tuple(check_value(key, v, f"{where}: grid.{key}[{i}]")
                                       for i, v in enumerate(values))))
        return Sweep(path, tuple(checked), None)
    trials = doc["trials"]
    if not isinstance(trials, list) or not trials:
        raise ConfigError(f"{where}: trials must be a non-empty list of objects")
    out = []
    for i, trial in enumerate(trials):
        if not isinstance(trial, dict):
            raise ConfigError(f"{where}: trials[{i}] must be an object of setting -> value")
        for key in trial:
            check_key(key, f"{where}: trials[{i}].{key}")
        out.append(tuple((k, check_value(k, v, f"{where}: trials[{i}].{k}"))
                         for k, v in trial.items()))
    return Sweep(path, None, tuple(out))


def check_key(key: str, where: str) -> None:
    """A key must be a setting of ``trainjob train`` that a trial may set."""
    if key in NOT_PER_TRIAL:
        raise ConfigError(f"{where}: {key} cannot be set per trial (each trial writes to "
                          "<--output>/trial-<NNN> on one pod); set it for the whole sweep")
    if key not in FIELDS:
        close = difflib.get_close_matches(key, [k for k in FIELDS if k not in NOT_PER_TRIAL], 1)
        hint = f"did you mean {close[0]}?" if close else \
            "keys are setting names as in `trainjob train --help`, with _ for -"
        raise ConfigError(f"{where}: unknown setting {key!r} ({hint})")


def check_value(key: str, value: Any, where: str) -> Any:
    """``value`` if it has the type (and is one of the choices) of setting ``key``."""
    f = FIELDS[key]
    default = f.default_factory() if callable(f.default_factory) else f.default
    choices, kind = f.metadata["choices"], f.metadata["type"] or type(default)
    if value is None and default is None:
        return value
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif choices:
        ok, expected = value in choices, "one of " + ", ".join(choices)
    elif kind is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
        value = float(value) if ok else value
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"{where}: {json.dumps(value)} is not {expected}")
    return value


def configure(options: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Config:
    """The run's Config from the command line's options, with the trial's settings and
    output when --sweep-file is given."""
    cfg = Config.from_options(**options)
    if cfg.sweep.sweep_file is None:
        return cfg
    if cfg.cluster.workers > 1:
        raise ConfigError(f"--workers {cfg.cluster.workers} with --sweep-file: a sweep runs "
                          "each trial on one pod; leave --workers at 1 (TRAINJOB_WORKERS)")
    sweep = load(cfg.sweep.sweep_file)
    index = trial_index(cfg.sweep.trial_index, sweep, env)
    settings = sweep.trial(index)
    width = max(3, len(str(sweep.count - 1)))
    merged = {**options, **dict(settings), "trial_index": index,
              "output": f"{cfg.output.output.rstrip('/')}/trial-{index:0{width}d}"}
    try:
        trial_cfg = Config.from_options(**merged)
    except ConfigError as exc:
        raise ConfigError(f"{sweep.source}: trial {index} ({describe(settings)}): {exc}") \
            from None
    log.info("sweep %s: trial %d of %d (%s) -> %s", sweep.source, index, sweep.count,
             describe(settings), trial_cfg.output.output)
    return dataclasses.replace(trial_cfg, trial=Trial(index, sweep.count, sweep.source,
                                                      settings))


def trial_index(given: int | None, sweep: Sweep, env: Mapping[str, str]) -> int:
    """--trial-index, else JOB_COMPLETION_INDEX; within the sweep."""
    if given is not None:
        index, source = given, f"--trial-index {given}"
    else:
        raw = env.get(INDEX_ENV)
        if raw is None:
            raise ConfigError(f"--sweep-file {sweep.source} needs --trial-index N (or "
                              f"{INDEX_ENV}, which Kubernetes sets in an Indexed Job's pods)")
        if not raw.strip().isdigit():
            raise ConfigError(f"{INDEX_ENV}={raw!r} is not a trial index (0 or more)")
        index, source = int(raw), f"{INDEX_ENV}={raw.strip()}"
    if index >= sweep.count:
        raise ConfigError(f"{source} is out of range: {sweep.source} has {sweep.count} trials "
                          f"(0-{sweep.count - 1}); the Job's completions must be "
                          f"{sweep.count}")
    return index


def describe(settings: tuple[tuple[str, Any], ...]) -> str:
    """``learning_rate=0.001, optimizer=sgd`` (an empty trial: the defaults)."""
    return ", ".join(f"{k}={v}" for k, v in settings) or "no overrides"

