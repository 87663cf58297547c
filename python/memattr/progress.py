"""Progress bars for long runs: done / total, rate, elapsed and ETA (rich).

A stream's length may be an estimate (a workload's records are only known
once generated) or unknown: the bar then shows the rate and the elapsed
time, and the total is corrected when the run ends.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}"


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``1.3M ops/s``."""

    def __init__(self, unit: str = "ops") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{_si(speed)} {self.unit}/s", style="progress.data.speed")


def bar(console: Console, unit: str = "ops", **kw: Any) -> Progress:
    """A transient progress bar: description, bar, done/total, rate,
    elapsed, remaining."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        **kw,
    )


__all__ = ["RateColumn", "bar"]
