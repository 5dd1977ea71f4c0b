"""The options the inspection commands share, each declared once with its TRAINJOB_* twin."""

from __future__ import annotations

from typing import Any, Callable

import logging
import sys

import click

ENV_PREFIX = "TRAINJOB"


def env_option(*decls: str, name: str, **kwargs: Any) -> Callable:
    """A click option whose environment twin is TRAINJOB_<NAME>."""
    return click.option(*decls, envvar=f"{ENV_PREFIX}_{name.upper()}", show_envvar=True,
                        **kwargs)


json_output = env_option("--json", "as_json", name="json", is_flag=True,
                         help="Print JSON instead of a table.")
threads = env_option("--threads", name="threads", type=click.IntRange(1, 256), default=16,
                     show_default=True, help="Parallel S3 requests.")


def logs_to_stderr() -> None:
    """Keep stdout for the command's output (tables, JSON): log lines go to stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
