"""Pieces every training stage shares (pretrain, mid, sft, rl).

- schedules: LR warmup/constant/warmdown, Muon momentum, Muon weight decay (nanochat HEAD)
- `LossEMA` (debiased), `StepLine` (the dense per-step line), `Reporter` (rich bar on a TTY, plain
  lines otherwise, rank 0 only)
- `StopSignal`: Ctrl+C / SIGTERM ask the loop to save and stop at the next step boundary
- checkpoint + resume plumbing on top of nanoctl.checkpoint: per-rank optimizer shards, gathered loader
  states, RNG states, config comparison
- determinism and GC helpers, torch.compile policy
"""

from __future__ import annotations

import base64
import gc
import io
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl.errors import NanoctlError

# cuDNN attention's backward warns once per process that it is not bitwise deterministic; we know, and
# the warning's wording would read like a problem in every training log on a GPU.
warnings.filterwarnings("ignore", message="cuDNN Attention defaults to a non-deterministic")

if TYPE_CHECKING:
    import torch

    from nanoctl.dist import DistInfo


# --- schedules --------------------------------------------------------------------------------------


def lr_multiplier(
    step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float
) -> float:
    """Linear warmup over `warmup_steps`, constant, then linear warmdown over the last
    `warmdown_ratio` of the run down to `final_lr_frac` (nanochat HEAD base_train)."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1.0 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """0.85 -> 0.97 over the first 400 steps, hold, then 0.97 -> 0.90 across the warmdown."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= warmdown_start and warmdown_iters > 0:
        progress = (step - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine decay from `weight_decay` to 0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / max(1, num_iterations)))


def apply_schedules(
    optimizer: Any, lrm: float, momentum: float | None = None, weight_decay: float | None = None
) -> None:
    """Set every group's lr = initial_lr * lrm; Muon groups also get momentum and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay


# --- per-step reporting -----------------------------------------------------------------------------


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


# --- Ctrl+C / SIGTERM -------------------------------------------------------------------------------


class StopSignal:
    """First Ctrl+C (or SIGTERM) sets `requested`; the loop saves at the next step boundary and raises
    `Interrupted` (exit 130). A second Ctrl+C aborts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested}: saving a checkpoint at the end of this step (Ctrl+C again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def should_stop(self, device: torch.device) -> bool:
        """Agreed across ranks (any rank signalled -> all stop at the same step)."""
        from nanoctl.dist import all_reduce_max

        return all_reduce_max(1.0 if self.requested else 0.0, device) > 0


# --- determinism, GC, compile -------------------------------------------------------------------------


def seed_everything(seed: int, rank: int = 0, deterministic: bool = True) -> None:
    """Same seed on every rank for the weights (init before any rank-specific randomness)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cheap on CPU; warn_only so an op without a deterministic kernel does not crash training
        torch.use_deterministic_algorithms(True, warn_only=True)


def set_cpu_threads(n: int | None) -> int:
    """Fix the intra-op thread count (results depend on it on CPU); default: all cores / local procs."""
    import torch

    if n is None or n <= 0:
        env = os.environ.get("OMP_NUM_THREADS")
        n = int(env) if env and env.isdigit() else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def rng_state_b64() -> str:
    import torch

    buf = io.BytesIO()
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def restore_rng_state(b64: str | None) -> None:
    import torch

    if not b64:
        return
    state = torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:
            pass  # a different GPU count: CUDA RNG is not used by training anyway


class GCFreeze:
    """nanochat's trick: after the first step collect, freeze and disable the GC (avoids ~500 ms pauses
    scanning long-lived objects); collect manually every `every` steps."""

    def __init__(self, every: int = 5000) -> None:
        self.every = every
        self.frozen = False

    def after_step(self, step: int) -> None:
        if not self.frozen:
            gc.collect()
            gc.freeze()
            gc.disable()
            self.frozen = True
        elif step % self.every == 0:
            gc.collect()

    def close(self) -> None:
        if self.frozen:
            gc.unfreeze()
            gc.enable()
            self.frozen = False


def want_compile(mode: str, device: torch.device) -> bool:
    """--compile auto|on|off: auto compiles on CUDA only (CPU compile costs minutes for little gain)."""
    if mode not in ("auto", "on", "off"):
        from nanoctl.errors import UsageError

        raise UsageError(f"--compile {mode!r} is not one of auto, on, off")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


# --- checkpoints + resume -----------------------------------------------------------------------------


def gather_loader_state(state: dict[str, Any]) -> dict[str, Any]:
    """All ranks' loader states in one JSON-able dict for rank 0's meta file."""
    from nanoctl.dist import all_gather_object

    states = all_gather_object(state)
    return {"world_size": len(states), "ranks": states}


def rank_loader_state(saved: dict[str, Any] | None, rank: int, world_size: int) -> dict[str, Any] | None:
    if not saved:
        return None
    if saved.get("world_size") != world_size:
        raise NanoctlError(
            f"checkpoint was written by {saved.get('world_size')} process(es), this run has {world_size}",
            f"resume with --nproc-per-node {saved.get('world_size')} (x nodes), or start fresh with --force",
        )
    return saved["ranks"][rank]


def save_training_checkpoint(
    directory: Path,
    step: int,
    model: Any,
    optimizer: Any,
    meta: dict[str, Any],
    info: DistInfo,
    keep_last: int = 0,
) -> Path:
    """Every rank writes its optimizer shard; after a barrier rank 0 writes model + meta (meta last,
    marking the step complete), then prunes to the newest `keep_last` steps."""
    from nanoctl.checkpoint import prune_checkpoints, save_checkpoint
    from nanoctl.dist import barrier

    if info.rank != 0:
        save_checkpoint(directory, step, None, optimizer.state_dict(), None, rank=info.rank)
    barrier()  # every shard is on disk before rank 0 writes meta (which marks the step complete)
    if info.rank == 0:
        save_checkpoint(directory, step, unwrap(model).state_dict(), optimizer.state_dict(), meta, rank=0)
        if keep_last > 0:
            prune_checkpoints(directory, keep_last)
    barrier()
    return directory


def unwrap(model: Any) -> Any:
    """The module under torch.compile."""
    return getattr(model, "_orig_mod", model)


def find_resume_step(directory: Path) -> int | None:
    """Latest complete step in a checkpoint directory (meta written), or None."""
    from nanoctl.cache import checkpoint_steps

    steps = checkpoint_steps(directory) if directory.is_dir() else []
    return steps[-1] if steps else None


def config_diff(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """`name: saved -> current` for each key whose value differs."""
    diffs = []
    for k in keys:
        a, b = saved.get(k), current.get(k)
        if isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
        else:
            same = a == b
        if not same:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs


@dataclass
class LoopState:
    """What a loop needs besides weights/optimizer/data to continue exactly where it stopped."""

    step: int = 0
    ema: dict[str, float] = field(default_factory=dict)
    min_val_bpb: float = float("inf")
    total_training_time: float = 0.0
    val_bpb: float | None = None
    loss_scaler: dict[str, float] = field(default_factory=dict)  # fp16 runs only
    core_metric: float | None = None  # the last CORE measured during pretraining

    def to_dict(self) -> dict[str, Any]:
        out = {
            "step": self.step,
            "smooth_train_loss": self.ema,
            "min_val_bpb": None if not math.isfinite(self.min_val_bpb) else self.min_val_bpb,
            "total_training_time": self.total_training_time,
            "val_bpb": self.val_bpb,
        }
        if self.loss_scaler:
            out["loss_scaler"] = self.loss_scaler
        if self.core_metric is not None:
            out["core_metric"] = self.core_metric
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LoopState:
        d = d or {}
        mv = d.get("min_val_bpb")
        return cls(
            step=d.get("step", 0),
            ema=d.get("smooth_train_loss") or {},
            min_val_bpb=float("inf") if mv is None else mv,
            total_training_time=d.get("total_training_time", 0.0),
            val_bpb=d.get("val_bpb"),
            loss_scaler=d.get("loss_scaler") or {},
            core_metric=d.get("core_metric"),
        )


class LossScaler:
    """Dynamic loss scaling for fp16 compute (torch.amp.GradScaler's policy), agreed across ranks.

    fp16 activation gradients underflow without it. The loss is multiplied by `scale` before backward;
    before the optimizer step the gradients are divided back and checked: if any is inf/NaN on any rank,
    every rank skips the step and halves the scale; after `growth_interval` clean steps it doubles.
    Disabled (bf16/fp32) it is a no-op. GradScaler itself is not used because its per-rank overflow check
    would let ranks disagree about skipping, and our optimizer's collectives would then hang.
    """

    def __init__(self, enabled: bool, state: dict[str, float] | None = None, growth_interval: int = 2000):
        self.enabled = enabled
        self.growth_interval = growth_interval
        state = state or {}
        self.scale = float(state.get("scale", 2.0**16)) if enabled else 1.0
        self.good_steps = int(state.get("good_steps", 0))

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale gradients in place; False means: skip this step (an overflow happened somewhere)."""
        if not self.enabled:
            return True
        import torch
        import torch.distributed as dist

        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        torch._foreach_mul_(grads, 1.0 / self.scale)
        bad = torch.logical_not(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.scale /= 2.0
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps} if self.enabled else {}


# --- sampling ----------------------------------------------------------------------------------------

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def greedy_samples(
    model: Any, tokenizer: Any, prompts: Iterable[str] = SAMPLE_PROMPTS, max_tokens: int = 16
) -> Iterator[str]:
    """Greedy continuations of fixed prompts (rank 0 only; uses the uncompiled model)."""
    import torch

    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                out = list(m.generate(ids, max_tokens=max_tokens, temperature=0.0))
                yield prompt + tokenizer.decode(out)
    finally:
        m.train(was_training)


@contextmanager
def timed() -> Iterator[list[float]]:
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0
