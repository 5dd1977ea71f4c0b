"""Test hooks: behaviour a test sets for the process under test (a pause after an epoch or
a batch, scripted metrics, fast lock timings, a stand-in backbone with ResNet50's bytes),
read from the JSON file named by TRAINJOB_TEST_HOOKS.

Unset in production, so every hook is inert. Nothing here imports TensorFlow: the lock and
other early code read hooks before training starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainjob.errors import ConfigError

ENV = "TRAINJOB_TEST_HOOKS"


def read_hooks() -> dict:
    """The hooks as a dict; {} when TRAINJOB_TEST_HOOKS is unset."""
    path = os.environ.get(ENV)
    if not path:
        return {}
    try:
        hooks = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{ENV}={path}: unreadable test hooks ({exc})") from exc
    if not isinstance(hooks, dict):
        raise ConfigError(f"{ENV}={path}: test hooks must be a JSON object")
    return hooks
