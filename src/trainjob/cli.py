"""Command line: parse options, build the config, set up logging, run, map errors to exit codes."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

import click

from trainjob import __version__, termination
from trainjob.commands import dataset as dataset_commands
from trainjob.commands import predict as predict_commands
from trainjob.commands import runs as runs_commands
from trainjob.commands.options import ENV_PREFIX, GroupedCommand, config_option
from trainjob.config import option_fields
from trainjob.errors import ClusterError, ConfigError, Preempted, TrainJobError
from trainjob.run import sweep

log = logging.getLogger(__name__)


def _add_config_options(command: click.Command) -> click.Command:
    command.params.extend(config_option(group, f) for group, f in option_fields())
    return command


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        max(-2, verbosity), logging.DEBUG)
    # Progress goes to stdout; stderr is kept for the one-line error a failure prints.
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "PIL", "matplotlib", "h5py"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # TensorFlow's C++ logging is read once at import: quiet it before anything imports TF.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity > 1 else "2")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trainjob")
@click.option("--debug", is_flag=True, envvar=f"{ENV_PREFIX}_DEBUG", show_envvar=True,
              help="Show tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="More logging (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less logging (repeatable).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int, quiet: int) -> None:
    """Train Keras ResNet50 on an image-classification dataset from S3-compatible storage."""
    ctx.obj = {"debug": debug}
    _setup_logging(verbose - quiet)


@cli.command(cls=GroupedCommand)
@click.pass_context
def train(ctx: click.Context, **options: Any) -> None:
    """Train on --data and write the run folder to --output.

    Every option can also be set as TRAINJOB_<OPTION_NAME>, e.g. TRAINJOB_EPOCHS=50.
    """
    cfg = sweep.configure(options)  # with --sweep-file: one trial's settings and folder
    termination.record_run(cfg.output.output)
    from trainjob import job  # after logging is set up, so TF's import stays quiet

    job.run(cfg)


_add_config_options(train)
cli.add_command(runs_commands.runs)
cli.add_command(dataset_commands.dataset)
cli.add_command(predict_commands.predict)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: one line on stderr and a typed exit code for every failure, and
    the same outcome in the termination message (termination.py) on every exit."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or \
        os.environ.get(f"{ENV_PREFIX}_DEBUG", "").lower() in ("1", "true", "yes")
    termination.record_run(None)
    try:
        rc = cli.main(args=argv, prog_name="trainjob", standalone_mode=False)
        rc = rc if isinstance(rc, int) else 0
        termination.write(rc, "")
        return rc
    except click.exceptions.Exit as exc:
        termination.write(exc.exit_code, "")
        return exc.exit_code
    except click.ClickException as exc:
        path = exc.ctx.command_path if getattr(exc, "ctx", None) else "trainjob train"
        hint = f" (see '{path} --help')" if isinstance(exc, click.UsageError) else ""
        return _fail(ConfigError(exc.format_message() + hint), debug)
    except click.exceptions.Abort:
        return _fail(TrainJobError("aborted"), debug, 130)
    except (Preempted, ClusterError) as exc:
        code = _fail(exc, debug)
        # Inside the grace period: boto3's transfer threads still stuck on a hung store
        # would hold a normal interpreter exit until their time-outs, as would TensorFlow's
        # threads still waiting on a peer. What had to be saved is saved or abandoned by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except TrainJobError as exc:
        return _fail(exc, debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line too
        return _fail(TrainJobError(f"unexpected {type(exc).__name__}: {exc} "
                                   "(rerun with --debug for the traceback and report it)"),
                     debug)


def _fail(exc: TrainJobError, debug: bool, code: int | None = None) -> int:
    """Print the one error line, record it as the termination message; the exit code."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    message = " ".join(str(exc).split())  # always exactly one line
    click.echo(f"trainjob: error: {message}", err=True)
    code = exc.exit_code if code is None else code
    termination.write(code, message)
    return code


if __name__ == "__main__":
    sys.exit(main())
