"""``trainjob runs``: list, show and download run folders."""

from __future__ import annotations

import json
import logging

import click

from trainjob import runinfo, textfmt
from trainjob.commands import options
from trainjob.errors import ConfigError
from trainjob.storage import LocalStore, S3Store, Store, open_store

log = logging.getLogger(__name__)


@click.group(name="runs")
def runs() -> None:
    """Inspect and fetch run folders (reads only; never imports TensorFlow)."""
    options.logs_to_stderr()


def open_checked(uri: str, threads: int) -> Store:
    """The store at ``uri``; a missing bucket or local folder fails at once, in one line."""
    store = open_store(uri, threads)
    if isinstance(store, S3Store):
        store.check_bucket()
    elif isinstance(store, LocalStore) and not store.root.is_dir():
        raise ConfigError(f"{uri}: no such folder; give s3://bucket/prefix/ or a local folder")
    return store


@runs.command(name="list")
@click.argument("uri")
@options.json_output
@options.threads
def list_runs(uri: str, as_json: bool, threads: int) -> None:
    """One row per run folder directly under URI (e.g. s3://bucket/runs/)."""
    store = open_checked(uri, threads)
    rows = runinfo.summarize_runs(store, threads)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if not rows:
        click.echo(f"no run folders under {store.uri}", err=True)
        return
    click.echo(render_list(rows))


def render_list(rows: list[runinfo.RunSummary]) -> str:
    """The text table of ``runs list``."""
    headers = ["RUN", "STATUS", "EPOCHS", "BEST VAL_ACC", "TEST MPCA", "STARTED (UTC)",
               "DURATION", "HEARTBEAT"]
    body = []
    for r in rows:
        epochs = f"{_or_dash(r.epochs_done)}/{_or_dash(r.epochs_planned)}"
        beat = None
        if r.heartbeat_age_seconds is not None:
            beat = f"{textfmt.duration(r.heartbeat_age_seconds)} ago"
            if r.status == "stale":
                beat += " (stale)"
        body.append([r.name, r.status, epochs, r.best_val_accuracy,
                     r.test_mean_per_class_accuracy, textfmt.timestamp(r.started),
                     textfmt.duration(r.duration_seconds), beat])
    return textfmt.table(headers, body, right=(2, 3, 4, 6))


def _or_dash(value: object) -> str:
    return textfmt.MISSING if value is None else str(value)
