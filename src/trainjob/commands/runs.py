"""``trainjob runs``: list, show, compare and download run folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from trainjob.commands import options
from trainjob.errors import ConfigError
from trainjob.inspect import runcompare, rundownload, runinfo, textfmt
from trainjob.run.folder import MANIFEST, STATUS
from trainjob.store.base import Store
from trainjob.store.local import LocalStore
from trainjob.store.s3 import S3Store
from trainjob.store.uri import open_store

log = logging.getLogger(__name__)


@click.group(name="runs")
def runs() -> None:
    """List, show, compare and download run folders (never imports TensorFlow)."""
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
        hint = ""
        if any(store.exists(name) for name in (STATUS, MANIFEST)):
            hint = f" ({store.uri} is itself a run folder: see 'trainjob runs show {uri}')"
        click.echo(f"no run folders under {store.uri}{hint}", err=True)
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


@runs.command(name="show")
@click.argument("uri")
@options.json_output
@options.threads
def show(uri: str, as_json: bool, threads: int) -> None:
    """Status, metrics, key settings and the training log of the run folder URI."""
    details = runinfo.read_details(open_checked(uri, threads), threads)
    if as_json:
        click.echo(json.dumps(details, indent=2, default=str))
        return
    click.echo(render_show(details))


def render_show(d: dict) -> str:
    """The text of ``runs show``: sections separated by blank lines."""
    s, status = d["summary"], d["status"]
    head = [("run", s["uri"]), ("status", s["status"] + ("" if s["finished"] else
                                                       " (no manifest.json: unfinished)")),
            ("epochs", f"{_or_dash(s['epochs_done'])}/{_or_dash(s['epochs_planned'])}"),
            ("phase", status.get("phase")),
            ("started", textfmt.timestamp(s["started"]) + " UTC" if s["started"] else None),
            ("duration", textfmt.duration(s["duration_seconds"]))]
    if d["lock"]:
        beat = f"{textfmt.duration(s['heartbeat_age_seconds'])} ago"
        head.append(("lock", f"{d['lock'].get('host')} pid {d['lock'].get('pid')}, "
                     f"heartbeat {beat}" + (" (stale)" if s["status"] == "stale" else "")))
    if s["error"]:
        head.append(("error", s["error"]))
    head.append(("trainjob", d["trainjob_version"]))
    parts = [_pairs([(k, v) for k, v in head if v is not None])]
    if d["metrics"]:
        parts.append("Test metrics\n" + _pairs(sorted(d["metrics"].items())))
    if d["settings"]:
        parts.append("Settings\n" + _pairs(list(d["settings"].items())))
    if d["dataset"]:
        parts.append("Dataset\n" + _pairs(list(d["dataset"].items())))
    if d["log"]:
        parts.append(render_log(d["log"]))
    if d["worst_classes"]:
        parts.append(f"Lowest test accuracy ({len(d['worst_classes'])} classes)\n"
                     + textfmt.table(["CLASS", "ACCURACY"], d["worst_classes"], right=(1,)))
    if d["confusions"] is not None:
        rows = [[c["true"], c["predicted"], c["count"]] for c in d["confusions"]]
        parts.append("Most frequent confusions\n"
                     + textfmt.table(["TRUE", "PREDICTED", "COUNT"], rows, right=(2,)))
    elif d["worst_classes"]:
        parts.append("Most frequent confusions: not recorded (metrics.json of this run has "
                     "per-class accuracy only)")
    return "\n\n".join(parts)


def render_log(rows: list[dict]) -> str:
    """training_log.csv as a table, then a sparkline of val_accuracy."""
    headers = list(rows[0])
    if "epoch" in headers:
        headers.remove("epoch")
        headers.insert(0, "epoch")
    table = textfmt.table(headers, [[r.get(h) for h in headers] for r in rows],
                          right=tuple(range(len(headers))))
    text = f"Training log ({len(rows)} epochs)\n{table}"
    values = [r.get("val_accuracy") for r in rows]
    known = [(v, r.get("epoch")) for v, r in zip(values, rows) if v is not None]
    if known:
        best, at = max(known, key=lambda ve: ve[0])
        text += (f"\n\nval_accuracy  {textfmt.sparkline(values)}  {known[0][0]:.4f} -> "
                 f"{known[-1][0]:.4f}, best {best:.4f} at epoch {at}")
    return text


def _pairs(items: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in items)
    return "\n".join(f"  {k.ljust(width)}  {textfmt.cell(v)}" for k, v in items)


@runs.command(name="compare")
@click.argument("uri")
@options.env_option("--sort", name="sort", type=click.Choice(list(runcompare.SORTS)),
                    default=runcompare.DEFAULT_SORT, show_default=True,
                    help="The metric that orders the runs, best first (accuracies highest "
                    "first, losses lowest first).")
@options.env_option("--plot", name="plot", metavar="FILE",
                    type=click.Path(dir_okay=False, path_type=Path),
                    help="Also draw the runs' validation curves side by side into FILE "
                    "(.png, .svg, .pdf).")
@options.json_output
@options.threads
def compare(uri: str, sort: str, plot: Path | None, as_json: bool, threads: int) -> None:
    """The run folders under URI (e.g. a sweep's s3://bucket/sweeps/exp1/) side by side: the
    settings that differ, validation accuracy and loss, test accuracy, epochs, state."""
    rows = runcompare.compare_runs(open_checked(uri, threads), threads, sort)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2, default=str))
    else:
        click.echo(runcompare.render(rows, sort))
    if plot is not None:
        runcompare.plot_curves(rows, plot)
        click.echo(f"validation curves of {len(rows)} runs written to {plot}", err=True)


@runs.command(name="download")
@click.argument("uri")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@options.env_option("--only", name="only", metavar="GROUPS",
                    help="Comma-separated groups to download: "
                    f"{', '.join(rundownload.GROUPS)} (logs: everything else). Default: all.")
@options.env_option("--allow-unfinished", name="allow_unfinished", is_flag=True,
                    help="Without manifest.json, download what exists, unchecked.")
@options.threads
def download(uri: str, target: Path, only: str | None, allow_unfinished: bool,
             threads: int) -> None:
    """Download the run folder URI into TARGET, each file checked against manifest.json
    (size and sha256)."""
    groups = rundownload.parse_only(only)
    store = open_checked(uri, threads)
    report = rundownload.download_run(store, target, only=groups,
                                      allow_unfinished=allow_unfinished, threads=threads)
    check = "checked against manifest.json" if report.verified else \
        "NOT checked: the run has no manifest.json (unfinished)"
    kept = f", {len(report.already_there)} already there" if report.already_there else ""
    click.echo(f"downloaded {len(report.downloaded)} files ({textfmt.size(report.bytes)})"
               f"{kept} to {report.target}, {check}")
