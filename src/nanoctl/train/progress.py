"""What a training run shows per step: the debiased loss EMA, the dense step line, and the console
reporter (a live rich display on a TTY, nanochat's plain lines otherwise, rank 0 only, all on stderr)."""

from __future__ import annotations

import math
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


LOG_FORMATS = ("auto", "rich", "plain")
_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 24) -> str:
    """The last `width` values as block characters, lowest to highest (the loss trend)."""
    vals = [v for v in values[-width:] if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    return "".join(_SPARK[int((v - lo) / span * (len(_SPARK) - 1)) if span > 0 else 0] for v in vals)


def wants_live(log_format: str, console: Any) -> bool:
    """`auto`: a live display exactly when the console is a terminal; `rich` forces it; `plain` never."""
    if log_format not in LOG_FORMATS:
        from nanoctl.errors import UsageError

        raise UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}",
                         "use --log-format plain for log files, rich to force the live display")
    return log_format == "rich" or (log_format == "auto" and bool(console.is_terminal))


class Reporter:
    """Rank-0 console output for a training loop.

    Live (a terminal, or `--log-format rich`): one rich display with step/total, loss, tok/s, MFU, elapsed,
    ETA and a loss sparkline; other messages (evals, checkpoints) print above it, and a step line lands in
    the scrollback every 10% so the record survives the display. Plain (a pipe, a log file, or
    `--log-format plain`): every step line exactly as nanochat prints it. Everything goes to stderr so
    `--json` results on stdout stay clean.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, log_format: str = "auto",
                 console: Any = None) -> None:
        from rich.console import Console

        self.enabled = enabled
        self.console = console if console is not None else Console(stderr=True, highlight=False)
        self.live = wants_live(log_format, self.console) and enabled
        self.total = total
        self.losses: list[float] = []
        self._every = max(1, total // 10)
        self._last_line = ""
        self._progress: Any = None
        self._task: Any = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            # Narrow enough for an 80-column terminal; rich would cut the figures with "…" otherwise.
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(bar_width=10),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("tok/s {task.fields[tok_s]}"),
                TextColumn("mfu {task.fields[mfu]}"),
                TextColumn("{task.fields[time]} eta {task.fields[eta]}"),
                TextColumn("[cyan]{task.fields[trend]}"),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, completed=start, loss="-", tok_s="-",
                                                 mfu="n/a", time="0s", eta="?", trend="")

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=self.console.file, flush=True)

    def step(self, line: StepLine | str, advance_to: int | None = None, *, loss: float | None = None,
             tok_per_sec: float | None = None, mfu: float | None = None, elapsed: float | None = None,
             eta: float | None = None) -> None:
        """One finished step: its plain line, and (live) the figures the display shows."""
        if not self.enabled:
            return
        if self._progress is None:
            self.print(str(line))
            return
        self._last_line = str(line)
        fields: dict[str, Any] = {}
        if loss is not None:
            self.losses.append(loss)
            fields.update(loss=f"{loss:.4f}", trend=sparkline(self.losses, width=12))
        if tok_per_sec is not None:
            fields["tok_s"] = f"{tok_per_sec:,.0f}"
        if mfu is not None:
            fields["mfu"] = f"{mfu:.1f}%"
        if elapsed is not None:
            fields["time"] = format_duration(elapsed)
        if eta is not None:
            fields["eta"] = format_duration(eta)
        if advance_to is not None:
            fields["completed"] = advance_to
            if advance_to % self._every == 0 or advance_to >= self.total:
                self.print(self._last_line)
                self._last_line = ""
        self._progress.update(self._task, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            if self._last_line:  # the step a run stopped at (Ctrl-C, NaN) stays in the scrollback
                print(self._last_line, file=self.console.file, flush=True)
                self._last_line = ""
