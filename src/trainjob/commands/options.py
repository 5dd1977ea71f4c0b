"""Click options, each declared once with its TRAINJOB_* twin.

Options that are settings of the job (``--cache-dir``, ``--threads``...) are built from
their declaration in ``config.py``, for ``train`` and for any other command that takes
them; the few options only the inspection commands have are declared here.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import click

from trainjob.config import option_fields

ENV_PREFIX = "TRAINJOB"


class GroupedOption(click.Option):
    """An option that remembers which help section it belongs to."""

    def __init__(self, *args: Any, group: str = "Other", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """Shows options under their group headings in --help."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                sections.setdefault(getattr(param, "group", "Other"), []).append(record)
        for title, rows in sections.items():
            with formatter.section(f"{title} options"):
                formatter.write_dl(rows)


def config_option(group: str, f: dataclasses.Field, *, required: bool | None = None
                  ) -> click.Option:
    """The click option of the setting ``f`` (a field of a config.py dataclass)."""
    meta = f.metadata
    name = f.name.replace("_", "-")
    default = f.default_factory() if callable(f.default_factory) else f.default
    kwargs: dict[str, Any] = {
        "help": meta["help"], "group": group, "show_default": default is not None,
        "envvar": f"{ENV_PREFIX}_{f.name.upper()}", "show_envvar": True,
    }
    if isinstance(default, bool):
        return GroupedOption([f"--{name}/--no-{name}"], default=default, **kwargs)
    if meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    else:
        kwargs["type"] = meta["type"] or (str if default is None else type(default))
    return GroupedOption([f"--{name}"], default=default,
                         required=meta["required"] if required is None else required, **kwargs)


def from_config(name: str, **overrides: Any) -> Callable:
    """A decorator adding the job setting ``name`` (as ``train`` has it) to a command."""
    matches = [(group, f) for group, f in option_fields() if f.name == name]
    if not matches:
        raise KeyError(f"no setting named {name!r} in config.py")
    option = config_option(*matches[0], **overrides)

    def add(fn: Callable) -> Callable:
        if isinstance(fn, click.Command):
            fn.params.append(option)
        else:
            fn.__dict__.setdefault("__click_params__", []).append(option)
        return fn

    return add


def env_option(*decls: str, name: str, **kwargs: Any) -> Callable:
    """An option of the inspection commands only; its twin is TRAINJOB_<NAME>."""
    return click.option(*decls, envvar=f"{ENV_PREFIX}_{name.upper()}", show_envvar=True,
                        **kwargs)


class ByteSize(click.ParamType):
    """A size in bytes: 4000000, 512K, 64MB (powers of 1000), 128MiB, 1GiB (of 1024)."""

    name = "size"
    UNITS: ClassVar[dict[str, int]] = {
        "": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
        "kib": 1024, "mib": 1024**2, "gib": 1024**3}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match and self.UNITS.get(match.group(2).lower())
        if not unit:
            self.fail(f"{value!r} is not a size: use bytes or a number with K, MB, MiB, "
                      "GiB...", param, ctx)
        size = int(float(match.group(1)) * unit)
        if size < 1:
            self.fail(f"{value!r} must be at least one byte", param, ctx)
        return size


json_output = env_option("--json", "as_json", name="json", is_flag=True,
                         help="Print JSON instead of a table.")
threads = from_config("threads")


def logs_to_stderr() -> None:
    """Keep stdout for the command's output (tables, JSON): log lines go to stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
