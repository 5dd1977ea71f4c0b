"""Plain-text rendering for the inspection commands: tables, sparklines, ages, sizes."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TextIO

SPARKS = "▁▂▃▄▅▆▇█"
MISSING = "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; the columns in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def cell(value: object) -> str:
    """One table cell: floats to 4 digits, None as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def sparkline(values: Sequence[float | None]) -> str:
    """One block character per value, scaled between the smallest and largest; gaps blank."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low or 1.0
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        else:
            out.append(SPARKS[round((v - low) / span * (len(SPARKS) - 1))])
    return "".join(out)


def duration(seconds: float | None) -> str:
    """Like 45s, 12m05s, 3h02m, 2d04h."""
    if seconds is None or seconds < 0:
        return MISSING
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


def timestamp(epoch: float | None) -> str:
    """UTC, to the minute."""
    if epoch is None:
        return MISSING
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch))


def size(n: int | None) -> str:
    """Bytes in binary units."""
    if n is None:
        return MISSING
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class ProgressReporter:
    """Download progress: a redrawn bar on a terminal, else one line per 10% (logs)."""

    def __init__(self, label: str, stream: TextIO, tty: bool) -> None:
        self.label, self.stream, self.tty = label, stream, tty
        self.last_step = 0
        self.last_draw = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw >= 0.1 or (total and done >= total):
                self.last_draw = now
                self.stream.write("\r" + self.bar(done, total))
                if total and done >= total:
                    self.stream.write("\n")
                self.stream.flush()
            return
        if not total:
            return
        step = done * 10 // total
        if step > self.last_step:
            self.last_step = step
            self.stream.write(f"{self.label}: {step * 10}% ({size(done)} of {size(total)})\n")
            self.stream.flush()

    def bar(self, done: int, total: int | None, width: int = 30) -> str:
        if not total:
            return f"{self.label}: {size(done)}"
        filled = min(width, done * width // total)
        return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                f"{done * 100 // total:3d}% {size(done)} of {size(total)}")
