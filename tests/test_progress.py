"""Training progress: a live rich display on a terminal (step/total, loss, tok/s, MFU, elapsed, ETA, loss
sparkline), nanochat's plain step lines in a pipe or with --log-format plain. Driven through rich's own
Console(force_terminal=True) into a buffer, and through a real tmux pane."""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

import test_pretrain
from nanoctl.errors import UsageError
from nanoctl.train.progress import Reporter, StepLine, sparkline, wants_live

TINY, cli = test_pretrain.TINY, test_pretrain.cli
run_home, tokenizer_dir = test_pretrain.run_home, test_pretrain.tokenizer_dir  # the tiny-home fixtures


def _line(step: int, total: int, loss: float) -> StepLine:
    return StepLine(step, total, loss, 1.0, 0.05, 12345.0, None, step * 0.05, (total - step) * 0.05)


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=160, highlight=False), buf


def test_sparkline_follows_the_values() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▄▁"
    assert sparkline([1.0, 1.0]) == "▁▁"
    assert sparkline([float("nan")]) == ""
    assert len(sparkline(list(map(float, range(100))), width=24)) == 24


def test_plain_prints_every_step_line_exactly() -> None:
    console, buf = _console(terminal=False)
    rep = Reporter(20, console=console)
    assert not rep.live
    lines = [_line(s, 20, 5.0 - s / 10) for s in range(1, 21)]
    for s, line in enumerate(lines, 1):
        rep.step(line, advance_to=s, loss=line.loss, tok_per_sec=line.tok_per_sec, mfu=None)
    rep.close()
    assert buf.getvalue().splitlines() == [str(x) for x in lines]


def test_live_display_on_a_terminal_shows_the_figures_and_the_trend() -> None:
    console, buf = _console(terminal=True)
    rep = Reporter(20, console=console)
    assert rep.live
    rep.print("eval: val bpb 2.5")
    for s in range(1, 21):
        rep.step(_line(s, 20, 5.0 - s / 10), advance_to=s, loss=5.0 - s / 10, tok_per_sec=12345.0, mfu=12.5,
                 elapsed=s * 3.0, eta=(20 - s) * 3.0)
        rep._progress.refresh()  # what the auto-refresh thread draws, without waiting for it
    shown = buf.getvalue()
    rep.close()
    assert "eval: val bpb 2.5" in shown
    for piece in ("train", "/20", "loss 3.1000", "tok/s 12,345", "mfu 12.5%", "1m00s eta 0s", "█"):
        assert piece in shown, piece
    # The trend falls with the loss: the newest block is the lowest.
    trend = re.findall(r"[▁▂▃▄▅▆▇█]{5,}", shown)[-1]
    assert trend[0] == "█" and trend[-1] == "▁"
    # Only every 10% lands in the scrollback as a step line, not all 20.
    kept = re.findall(r"step (\d{5})/00020", shown)
    assert sorted(set(kept)) == [f"{s:05d}" for s in range(2, 21, 2)]


def test_log_format_overrides_the_terminal_check() -> None:
    term, _ = _console(terminal=True)
    pipe, _ = _console(terminal=False)
    assert not wants_live("plain", term)
    assert wants_live("rich", pipe)
    assert wants_live("auto", term) and not wants_live("auto", pipe)
    with pytest.raises(UsageError, match="--log-format"):
        wants_live("fancy", term)
    assert not Reporter(5, enabled=False, log_format="rich", console=term).live  # ranks > 0 stay quiet


def test_piped_run_keeps_one_plain_line_per_step(run_home: Path) -> None:
    proc = cli(run_home, *TINY, "--num-iterations", "6", "--eval-every", "-1")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    steps = re.findall(r"^step (\d{5})/00006 \(.*\| loss [\d.]+ \| lrm .*\| tok/s .*\| eta ", err, re.M)
    assert steps == [f"{s:05d}" for s in range(1, 7)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_live_display_in_a_real_tmux_pane(run_home: Path, tmp_path: Path) -> None:
    session = f"nanoctl-progress-{time.monotonic_ns()}"
    done = tmp_path / "done"
    argv = [sys.executable, "-m", "nanoctl", "--home", str(run_home), "pretrain", *TINY, "--num-iterations", "60",
            "--eval-every", "-1"]
    script = f"NANOCTL_STEP_SLEEP=0.05 OMP_NUM_THREADS=1 {shlex.join(argv)}; echo $? > {done}; sleep 600"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "50", script], check=True)
    try:
        live = ""
        deadline = time.monotonic() + 300
        while not done.exists() and time.monotonic() < deadline:
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout
            bars = [x for x in pane.splitlines() if x.startswith("train ") and "tok/s" in x]
            if bars:
                live = bars[-1]
            time.sleep(0.2)
        assert done.exists() and done.read_text().strip() == "0"
        assert re.search(r"\d+/60 loss [\d.]+ tok/s [\d,]+ mfu n/a \w+ eta \w+ [▁▂▃▄▅▆▇█]+$", live), live
        final = subprocess.run(["tmux", "capture-pane", "-p", "-S", "-200", "-t", session], capture_output=True,
                               text=True).stdout
        kept = re.findall(r"^step (\d{5})/00060", final, re.M)
        assert kept == [f"{s:05d}" for s in range(6, 61, 6)], final  # every 10%, not every step
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
