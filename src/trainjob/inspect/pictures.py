"""matplotlib for the pictures of a run (the training layer's and ``runs compare``'s), on the
Agg backend (no display), imported only when a picture is drawn: the inspection commands
answer in a second otherwise."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
