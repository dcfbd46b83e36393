"""Training checkpoints on top of nanoctl.checkpoint: per-rank optimizer shards, gathered data-loader
states, the loop's running record, and the comparison that decides whether a run may resume."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl.errors import NanoctlError
from nanoctl.train.runtime import unwrap

if TYPE_CHECKING:
    from nanoctl.dist import DistInfo


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
    model_state: dict[str, Any] | None = None,
) -> Path:
    """Every rank writes its optimizer shard; after a barrier rank 0 writes model + meta (meta last,
    marking the step complete), then prunes to the newest `keep_last` steps. `model_state` replaces the
    model's whole state dict (a LoRA run saves its adapters only)."""
    from nanoctl.checkpoint import prune_checkpoints, save_checkpoint
    from nanoctl.dist import barrier

    if info.rank != 0:
        save_checkpoint(directory, step, None, optimizer.state_dict(), None, rank=info.rank)
    barrier()  # every shard is on disk before rank 0 writes meta (which marks the step complete)
    if info.rank == 0:
        state = unwrap(model).state_dict() if model_state is None else model_state
        save_checkpoint(directory, step, state, optimizer.state_dict(), meta, rank=0)
        if keep_last > 0:
            prune_checkpoints(directory, keep_last)
    barrier()
    return directory


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
    """What the loop needs besides weights, optimizer and data to continue exactly where it stopped.
    Stages add their own keys (val bpb history, CORE ...) next to these in the meta's loop_state."""

    step: int = 0
    ema: dict[str, float] = field(default_factory=dict)
    total_training_time: float = 0.0
    loss_scaler: dict[str, float] = field(default_factory=dict)  # fp16 runs only

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "smooth_train_loss": self.ema,
            "total_training_time": self.total_training_time,
        }
        if self.loss_scaler:
            out["loss_scaler"] = self.loss_scaler
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LoopState:
        d = d or {}
        return cls(
            step=d.get("step", 0),
            ema=d.get("smooth_train_loss") or {},
            total_training_time=d.get("total_training_time", 0.0),
            loss_scaler=d.get("loss_scaler") or {},
        )
