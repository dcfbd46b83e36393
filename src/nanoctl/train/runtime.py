"""The process-level set-up of a training run: seeds and determinism, CPU threads, RNG state for
checkpoints, the GC freeze, the compile policy, and fp16 loss scaling."""

from __future__ import annotations

import base64
import gc
import io
import os
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# cuDNN attention's backward warns once per process that it is not bitwise deterministic; we know, and
# the warning's wording would read like a problem in every training log on a GPU.
warnings.filterwarnings("ignore", message="cuDNN Attention defaults to a non-deterministic")


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


def unwrap(model: Any) -> Any:
    """The module under torch.compile."""
    return getattr(model, "_orig_mod", model)


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
