"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary size (nanochat's evaluate_bpb).

bpb = (sum of per-token losses in nats over tokens that decode to >= 1 byte) / (ln 2 * sum of those bytes).
Special tokens have 0 bytes in token_bytes, so they count neither in the numerator nor the denominator;
targets of -1 (ignore) count in neither. Sums are all-reduced when torch.distributed is initialized, so
every rank returns the same global value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def bpb_sums(
    losses: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nats, bytes) for one batch of per-token losses (any shape) and their targets (same shape)."""
    losses = losses.reshape(-1).float()
    y = targets.reshape(-1)
    valid = y >= 0
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    nbytes = torch.where(valid, token_bytes[y_safe].to(y.device), torch.zeros_like(y)).to(torch.int64)
    counted = nbytes > 0
    # where(), not multiply: a masked position may carry an inf/nan loss (e.g. ignore_index) that 0*x keeps.
    nats = torch.where(counted, losses, torch.zeros_like(losses)).sum()
    return nats, nbytes.sum()


@torch.no_grad()
def evaluate_bpb(
    model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int, token_bytes: torch.Tensor
) -> float:
    """Mean bits per byte over `steps` (inputs, targets) batches; inf if no byte was counted."""
    import torch.distributed as dist

    device = model.get_device() if hasattr(model, "get_device") else next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    it = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            break
        x, y = x.to(device), y.to(device)
        losses = model(x, y, loss_reduction="none")
        nats, nbytes = bpb_sums(losses, y, token_bytes)
        total_nats += nats.double()
        total_bytes += nbytes
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    n_bytes = int(total_bytes.item())
    if n_bytes == 0:
        return float("inf")
    return float(total_nats.item()) / (math.log(2) * n_bytes)
