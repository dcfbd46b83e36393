"""What a training run shows per step: the debiased loss EMA, the dense step line, and the console
reporter (a rich bar on a TTY, plain lines otherwise, rank 0 only, all on stderr)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any


class LossEMA:
    """Debiased exponential moving average of the training loss (nanochat: beta 0.9)."""

    def __init__(self, beta: float = 0.9, value: float = 0.0, count: int = 0) -> None:
        self.beta, self.value, self.count = beta, value, count

    def update(self, loss: float) -> float:
        self.value = self.beta * self.value + (1 - self.beta) * loss
        self.count += 1
        return self.debiased

    @property
    def debiased(self) -> float:
        return self.value / (1 - self.beta**self.count) if self.count else float("nan")

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "value": self.value, "count": self.count}

    @classmethod
    def from_state(cls, d: dict[str, Any] | None) -> LossEMA:
        return cls(**d) if d else cls()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class StepLine:
    """One dense line per step: `step k/N (pct) | loss | lrm | dt | tok/s | mfu | time | eta`."""

    step: int
    num_steps: int
    loss: float
    lrm: float
    dt: float  # seconds
    tok_per_sec: float
    mfu: float | None  # percent, None when unknown (CPU)
    total_time: float
    eta: float
    extra: str = ""

    def __str__(self) -> str:
        pct = 100 * self.step / max(1, self.num_steps)
        mfu = f"{self.mfu:.2f}%" if self.mfu is not None else "n/a"
        line = (
            f"step {self.step:05d}/{self.num_steps:05d} ({pct:5.1f}%) | loss {self.loss:.6f} | lrm {self.lrm:.3f}"
            f" | dt {self.dt * 1000:.1f}ms | tok/s {self.tok_per_sec:,.0f} | mfu {mfu}"
            f" | time {format_duration(self.total_time)} | eta {format_duration(self.eta)}"
        )
        return line + (f" | {self.extra}" if self.extra else "")


class Reporter:
    """Rank-0 console output for a training loop: a rich progress bar on a TTY, plain lines otherwise.

    Everything goes to stderr so `--json` results on stdout stay clean.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, tty: bool | None = None) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._progress: Any = None
        self._task: Any = None
        if enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True, highlight=False),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, completed=start)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def step(self, line: StepLine | str, advance_to: int | None = None) -> None:
        self.print(str(line))
        if self._progress is not None and advance_to is not None:
            self._progress.update(self._task, completed=advance_to)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
