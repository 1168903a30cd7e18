"""Progress bars for long work (rich), quiet when POTSTILL_QUIET is set or output is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


# Set in a process whose bars another process draws (train/side_by_side.py): called with a bar's
# description and total, it returns that bar's ``advance``.
SINK: Callable[[str, int], Callable[[int], None]] | None = None


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """``with progress("generate", n) as advance: advance(k)``."""
    if SINK is not None:
        yield SINK(description, total)
        return
    if os.environ.get("POTSTILL_QUIET") or not sys.stderr.isatty():
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


class _Counts:
    """What ``live_counts`` yields: ``advance(n)``, ``status(text)`` (beside the bar), ``note(line)``."""

    def __init__(self, bar=None, task=None, quiet: bool = False):
        self.bar, self.task, self.quiet = bar, task, quiet

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, status=text)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line)
        elif not self.quiet:
            print(line, file=sys.stderr)


@contextmanager
def live_counts(description: str, total: int) -> Iterator[_Counts]:
    """A bar with a status text (done / failed / retrying / tokens / spend) and an ETA."""
    quiet = bool(os.environ.get("POTSTILL_QUIET"))
    if quiet or not sys.stderr.isatty():
        yield _Counts(quiet=quiet)
        return
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield _Counts(bar, bar.add_task(description, total=total, status=""))


class _Bars:
    """What ``live_bars`` yields: bars added by key as their totals become known, and lines above them."""

    def __init__(self, bar=None):
        self.bar, self.tasks = bar, {}

    def add(self, key: str, description: str, total: int) -> None:
        if self.bar is not None:
            self.tasks[key] = self.bar.add_task(description, total=total)

    def advance(self, key: str, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.tasks[key], n)

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)


@contextmanager
def live_bars() -> Iterator[_Bars]:
    """Several bars at once, for work that other processes do and report here."""
    if os.environ.get("POTSTILL_QUIET") or not sys.stderr.isatty():
        yield _Bars()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield _Bars(bar)
