"""How long an eval will take, measured on the model and device at hand (`nanoctl eval base --dry-run`).

Each part runs a small slice of the real work and scales it by the planned amount, so the estimate
follows the machine, the model's size and vocabulary, and the bundle's prompt lengths:

- bpb: two timed forwards (after one warm-up) of the real batch shape with random tokens (on a CPU, of
  at most 4 rows: its time is linear in the rows), scaled by batches per split x splits;
- CORE: the first `k` examples of each task (the same shuffled items the eval starts with) prepared and
  scored with the eval's own batched scorer, scaled by the task's example count (k = 1 on a CPU, 32 on a
  GPU, where batches must be full to be representative);
- samples: each generation timed at two lengths (prefill + per-token cost), extrapolated to the planned
  lengths.

Examples and batches are split across ranks under torchrun, so each part is divided by the world size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_bpb(model: Any, vocab_size: int, rows: int, seq_len: int, batches: int, device: torch.device) -> float:
    """Seconds for `batches` bpb forwards of `rows` x `seq_len` tokens."""
    measured_rows = rows if device.type == "cuda" else min(rows, 4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (measured_rows, seq_len), generator=gen).to(device)
    y = torch.roll(x, -1, dims=1)
    model(x, y, loss_reduction="none").sum().item()  # warm-up: first-call allocations and kernels
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(2):
        model(x, y, loss_reduction="none").sum().item()
    _sync(device)
    per_batch = (time.perf_counter() - t0) / 2 * rows / measured_rows
    return per_batch * batches


@torch.no_grad()
def time_core(
    model: Any,
    tokenizer: Any,
    device: torch.device,
    tasks: Sequence[Any],
    max_per_task: int,
    batch_rows: int,
    per_task: int | None = None,
) -> tuple[float, dict[str, float]]:
    """(seconds, seconds by task label) for CORE over `tasks` (present ones) with `max_per_task`."""
    from nanoctl.evaluate.core import (
        CPU_BATCH_TOKENS,
        DEFAULT_BATCH_TOKENS,
        count_examples,
        load_task_data,
        max_positions,
        prepare_example,
        score_examples_batched,
    )

    k = per_task or (32 if device.type == "cuda" else 1)
    batch_tokens = CPU_BATCH_TOKENS if device.type == "cpu" else DEFAULT_BATCH_TOKENS
    limit, pad = max_positions(model), tokenizer.get_bos_token_id()
    by_task: dict[str, float] = {}
    warmed = False
    for task in tasks:
        if not task.present:
            continue
        t0 = time.perf_counter()
        data = load_task_data(task, max_per_task)  # parsed once per task in the eval too: not scaled
        t_load = time.perf_counter() - t0
        n = count_examples(task, max_per_task)
        sample = list(range(min(k, len(data))))
        if not warmed:  # the first forward pays one-time costs the eval pays once too
            score_examples_batched(model, [prepare_example(0, data, task, tokenizer, limit)], pad, device,
                                   batch_rows, batch_tokens)
            warmed = True
        t0 = time.perf_counter()
        examples = [prepare_example(i, data, task, tokenizer, limit) for i in sample]
        score_examples_batched(model, examples, pad, device, batch_rows, batch_tokens)
        _sync(device)
        by_task[task.label] = t_load + (time.perf_counter() - t0) * n / max(1, len(sample))
    return sum(by_task.values()), by_task


@torch.no_grad()
def time_samples(
    model: Any, tokenizer: Any, prompts: Sequence[str], tokens: int, unconditioned: int, unconditioned_tokens: int
) -> float:
    """Seconds for the greedy continuations of `prompts` and the unconditioned samples."""
    from nanoctl.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()

    def cost(ids: list[int], n_samples: int, temperature: float, length: int) -> float:
        """prefill + length x per-token, from two short timed runs (2 and 6 tokens)."""
        times = []
        for m in (2, 6):
            params = SamplingParams(temperature=temperature, top_k=None, max_tokens=m, seed=42)
            t0 = time.perf_counter()
            engine.generate_batch(ids, params, num_samples=n_samples)
            times.append(time.perf_counter() - t0)
        per_token = max(0.0, (times[1] - times[0]) / 4)
        return max(0.0, times[0] - 2 * per_token) + per_token * length

    if not prompts and unconditioned <= 0:
        return 0.0
    cost([bos], 1, 0.0, 1)  # warm-up
    total = 0.0
    if prompts:
        total += len(prompts) * cost(tokenizer.encode(prompts[0], prepend=bos), 1, 0.0, tokens)
    if unconditioned > 0:
        total += cost([bos], unconditioned, 1.0, unconditioned_tokens)
    return total
