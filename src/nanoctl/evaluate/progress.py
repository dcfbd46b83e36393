"""Eval progress on stderr: a rich bar with a running figure on a terminal, sparse plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class EvalProgress:
    """`start(name, total)`, `update(done, note)`, `finish(line)`; silent when `enabled` is False."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None
        self._name = ""
        self._total = 0
        self._last_print = 0.0

    @property
    def name(self) -> str:
        """The running item's name ("" when none)."""
        return self._name

    def start(self, name: str, total: int) -> None:
        self._name, self._total = name, total
        if not self.enabled:
            return
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            if self._progress is None:
                self._progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"),
                    TimeRemainingColumn(),
                    console=Console(stderr=True),
                    transient=True,
                )
                self._progress.start()
            self._task = self._progress.add_task(name, total=total, note="")
        self._last_print = time.monotonic()

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        if self.tty and self._progress is not None:
            self._progress.update(self._task, completed=done, note=note)
        elif time.monotonic() - self._last_print > 10:  # plain logs: one line every 10 s at most
            print(f"  {self._name}: {done}/{self._total} {note}", file=sys.stderr, flush=True)
            self._last_print = time.monotonic()

    def finish(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tty and self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=sys.stderr, flush=True)
        self._name = ""

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
