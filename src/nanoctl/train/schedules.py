"""The LR and Muon schedules pretraining uses (nanochat HEAD), and how a multiplier reaches the groups."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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


# --- periodic work: the `--*-every N` options of every stage -------------------------------------------------


@dataclass(frozen=True)
class Every:
    """When the work of a `--*-every N` option runs. N > 0: every N steps (step 0 too when `at_start`) and
    at the end; 0: never; -1: at the end only, or never where `end_only` is False (nanochat's -1 = off,
    kept where the flag has always meant that: --core-metric-every, rl's --eval-every)."""

    at_start: bool = True
    end_only: bool = True  # what -1 means: at the end only (True) or never (False)

    @property
    def rule(self) -> str:
        """The sentinel values, for the option's help."""
        return "-1 = at the end only, 0 = never" if self.end_only else "-1 or 0 = never"

    def due(self, every: int | None, step: int, last: bool) -> bool:
        if not every:  # 0 (or unset): never
            return False
        if every < 0:  # -1
            return last and self.end_only
        return last or (step % every == 0 and (self.at_start or step > 0))

    def describe(self, every: int | None) -> str:
        """'every 50 steps and at the end' / 'at the end only' / 'never', for the plan lines."""
        if not every or (every < 0 and not self.end_only):
            return "never"
        return "at the end only" if every < 0 else f"every {every} steps and at the end"


EVERY = Every()  # -1 = at the end only
EVERY_AFTER_START = Every(at_start=False)  # the same, but N > 0 skips step 0 (samples, quick accuracy)
EVERY_OR_OFF = Every(end_only=False)  # -1 = never (nanochat's)
