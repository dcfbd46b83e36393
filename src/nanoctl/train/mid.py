"""Mid-training (`nanoctl mid`): nanochat OLD mid_train, continuing the base model on conversations.

- Data: nanochat's mid mixture (SmolTalk, MMLU auxiliary_train, GSM8K, identity x2, SimpleSpelling 200K,
  SpellingBee 80K), whichever sources are available (the rest are listed as missing), and/or
  `--data FILE.jsonl`. Val: SmolTalk test, MMLU test[:5200], GSM8K test[:420] (or a held-out slice).
- Rendered conversations are concatenated into one token stream and cut into B x T blocks: nothing is
  cropped (a long conversation simply spans blocks) and the loss covers every token, as nanochat.
- Horizon: one epoch over the mixture (`--num-iterations -1`) or a fixed number of steps.
- LR: constant for the first 80% of progress, then linearly to 0. Muon momentum 0.85 -> 0.95 over 300 steps.
- Val bpb every `eval_every` steps. Resume continues the stream exactly: the checkpoint records how many
  conversations were pulled in and how many of their tokens were still unread, and the tail is re-rendered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.options import OPTIMIZATION, OUTPUT, apply_preset, option
from nanoctl.tokenizer import RENDER_ALL
from nanoctl.train.parent import MixtureOptions, PostStage, lineage
from nanoctl.train.schedules import EVERY
from nanoctl.train.stage import Plan, Run, StageResult, StepStats, run_stage


@dataclass
class MidOptions(MixtureOptions):
    """Options of `nanoctl mid`. None = the device preset (GPU_PRESET on CUDA, else CPU_PRESET)."""

    num_iterations: int | None = option(None, help="Optimizer steps; -1 = one epoch over the mixture.", panel=OPTIMIZATION)
    device_batch_size: int | None = option(None, help="Rows per forward pass per process.", panel=OPTIMIZATION)
    total_batch_size: int | None = option(
        None, help="Tokens per optimizer step; -1 = one micro-batch per process.", unit="tokens", panel=OPTIMIZATION
    )
    max_seq_len: int | None = option(None, help="Tokens per row (unset: the model's context).", unit="tokens", panel=OPTIMIZATION)
    init_lr_frac: float = option(1.0, help="Starting LR as a fraction of the LRs above.", panel=OPTIMIZATION)
    eval_every: int | None = option(
        None, help=f"Val bpb every N steps and at the end ({EVERY.rule}).", unit="steps", panel=OUTPUT
    )
    eval_tokens: int | None = option(None, help="Val tokens per eval (-1 = 4 micro-batches).", unit="tokens", panel=OUTPUT)


GPU_PRESET = MidOptions(
    device_batch_size=32, total_batch_size=524288, num_iterations=-1, eval_every=150, eval_tokens=20 * 524288
)
CPU_PRESET = MidOptions(device_batch_size=4, total_batch_size=-1, num_iterations=30, eval_every=15, eval_tokens=-1)
PRESETS = {"CUDA": GPU_PRESET, "CPU": CPU_PRESET}


class MidBatches:
    """Rendered conversations concatenated into a token stream, cut into (B, T) input/target blocks.

    Rank r reads conversations r, r+W, ...; `wrapped` turns True once the rank has read its whole share
    (nanochat's last_step). `cursor` = conversations this rank has pulled into the stream.
    """

    def __init__(
        self,
        tokenizer: Any,
        task: Any,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        cursor: int = 0,
        buffered: int = 0,
    ) -> None:
        self.tokenizer, self.task = tokenizer, task
        self.B, self.T = batch_size, seq_len
        self.rank, self.world = rank, world_size
        self.cursor = cursor
        self.per_epoch = len(range(rank, len(task), world_size))
        if self.per_epoch == 0:
            raise NanoctlError(f"not enough conversations ({len(task)}) for {world_size} process(es)")
        self.buffer: deque[int] = deque()
        self.wrapped = cursor >= self.per_epoch
        if buffered:
            self._restore_buffer(buffered)
        self.rendered = 0

    @property
    def progress(self) -> float:
        """Fraction of this rank's epoch read so far."""
        return self.cursor / self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "buffered": len(self.buffer)}

    def _render(self, position: int) -> list[int]:
        index = self.rank + (position % self.per_epoch) * self.world
        ids, _ = self.tokenizer.render_conversation(self.task[index], max_tokens=RENDER_ALL)
        return ids

    def _restore_buffer(self, n: int) -> None:
        """Rebuild the stream's unread tail (the last `n` tokens pulled in) by rendering the conversations
        before `cursor` again, so a resume continues mid-conversation exactly where the stream stopped."""
        tail: list[int] = []
        position = self.cursor
        while len(tail) < n and position > 0:
            position -= 1
            tail = self._render(position) + tail
        self.buffer.extend(tail[len(tail) - n :])

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def __next__(self) -> tuple[Any, Any]:
        import torch

        needed = self.B * self.T + 1
        while len(self.buffer) < needed:
            ids = self._render(self.cursor)
            self.buffer.extend(ids)
            self.rendered += 1
            self.cursor += 1
            if self.cursor % self.per_epoch == 0:
                self.wrapped = True
        block = torch.tensor([self.buffer.popleft() for _ in range(needed)], dtype=torch.long)
        return block[:-1].view(self.B, self.T), block[1:].view(self.B, self.T)


def lr_multiplier(progress: float) -> float:
    """nanochat mid: 1.0 for the first 80% of progress, then linearly down to 0."""
    return 1.0 if progress < 0.8 else max(0.0, 1 - (progress - 0.8) / 0.2)


def muon_momentum(step: int) -> float:
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when `flag` is True on any rank."""
    from nanoctl.dist import all_reduce_max

    return all_reduce_max(1.0 if flag else 0.0, device) > 0


class Mid(PostStage):
    name = command = "mid"
    every_flags = {"eval_every": EVERY}

    def plan(self) -> Plan:
        o = self.o = apply_preset(self.opts, GPU_PRESET if self.device.type == "cuda" else CPU_PRESET)
        world = self.world_size
        ref, parent_meta, tag = self.find_parent()
        T = self.T = self.context_len(parent_meta)
        B = o.device_batch_size
        if B < 1:
            raise UsageError(f"--device-batch-size must be >= 1, got {B}")
        per_step = B * T * world
        total = self.total = o.total_batch_size if o.total_batch_size > 0 else per_step
        if total % per_step:
            raise UsageError(
                f"--total-batch-size {total:,} is not a multiple of --device-batch-size x context x processes = {B} x {T} x {world} = {per_step:,}",
                f"use --total-batch-size {max(1, round(total / per_step)) * per_step} or change --device-batch-size",
            )
        self.grad_accum = total // per_step
        self.eval_steps = max(1, (o.eval_tokens if o.eval_tokens > 0 else 4 * per_step) // per_step)
        self.mixture = self.mixture_of_options()
        iters = o.num_iterations if o.num_iterations and o.num_iterations > 0 else -1
        horizon = (
            f"{iters:,} steps" + (" (CPU preset)" if self.opts.num_iterations is None else "")
            if iters > 0
            else f"one epoch over {len(self.mixture.train):,} conversations (ends when the stream wraps)"
        )
        lines = [
            f"mid: {ref.stage}/{ref.tag}@{ref.step} -> checkpoints/mid/{tag}",
            f"preset: {'gpu' if self.device.type == 'cuda' else 'cpu'} defaults; context {T} tokens",
            f"batch: {total:,} tokens/step = {B} rows x {T} tokens x {world} process(es) x {self.grad_accum} grad accum step(s)"
            " (conversations concatenated, no padding, no cropping)",
            f"horizon: {horizon}; LR x{o.init_lr_frac}, constant then linear to 0 over the last 20%",
            f"LRs: embedding {o.embedding_lr}, unembedding {o.unembedding_lr}, matrix {o.matrix_lr}, scalar {o.scalar_lr}",
            f"eval: val bpb {EVERY.describe(o.eval_every)} over {self.eval_steps * per_step:,} tokens",
            "data:", *self.mixture.summary_lines(), *self.persona_lines(self.mixture),
        ]
        pre_bs = parent_meta.get("device_batch_size")
        if pre_bs is not None and B > pre_bs:
            lines.append(f"warning: base training used --device-batch-size {pre_bs}; {B} may not fit in memory")
        resume_keys = {
            "parent": lineage(ref), "--max-seq-len": T, "--device-batch-size": B, "--total-batch-size": total,
            "world size": world, "num_iterations": iters, "train conversations": len(self.mixture.train),
            "lrs": [o.embedding_lr, o.unembedding_lr, o.matrix_lr, o.scalar_lr, o.init_lr_frac],
            **self.persona_keys(),
        }
        meta = {"device_batch_size": B, "max_seq_len": T, "total_batch_size": total}
        return Plan(tag, iters, lines, resume_keys, meta, lineage(ref), T, details={"data": self.mixture.to_dict()})

    def start(self, run: Run, saved: dict[str, Any], loader_state: dict[str, Any] | None) -> None:
        from nanoctl.tokenizer import load_token_bytes

        info, loop = run.info, saved.get("loop_state") or {}
        self.progress = float(saved.get("progress", 0.0))
        self.val_bpb: float | None = loop.get("val_bpb")
        self.min_val_bpb = loop.get("min_val_bpb") or float("inf")
        self.token_bytes = load_token_bytes(self.home, device=run.device)
        state = loader_state or {}
        self.batches = MidBatches(run.tokenizer, self.mixture.train, self.o.device_batch_size, self.T, info.rank,
                                  info.world_size, state.get("cursor", 0), state.get("buffered", 0))

    def loader_state(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def finished(self, run: Run, step: int, num_steps: int) -> bool:
        # all ranks agree on the end (any rank's stream wrapped), as nanochat's all-reduced last_step
        if self.plan_steps > 0:
            return step >= self.plan_steps
        return any_rank(self.batches.wrapped, run.device)

    @property
    def plan_steps(self) -> int:
        return self.o.num_iterations if self.o.num_iterations and self.o.num_iterations > 0 else -1

    def estimated_steps(self, step: int) -> int:
        return max(step, round(step / max(self.progress, 1e-9))) if step else 1

    def step(self, run: Run, step: int) -> StepStats:
        import torch

        loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
        for _ in range(self.grad_accum):
            x, y = next(self.batches)
            loss = run.train_model(x.to(run.device), y.to(run.device))
            loss_sum += loss.detach().double()
            run.backward(loss / self.grad_accum)
            if self.plan_steps <= 0:
                self.progress = max(self.progress, self.batches.progress)  # monotone, as nanochat
        if self.plan_steps > 0:
            self.progress = step / self.plan_steps
        return StepStats(loss_sum / self.grad_accum, self.total, {"progress": self.progress},
                         f"data {100 * self.batches.progress:.2f}%")

    def schedule(self, step: int, num_steps: int) -> tuple[float, float | None, float | None]:
        return lr_multiplier(self.progress), muon_momentum(step), None

    def evaluate(self, run: Run, step: int, last: bool) -> dict[str, Any]:
        from nanoctl.evaluate.bpb import evaluate_bpb

        if not self.due("eval_every", step, last):
            return {}
        info = run.info
        run.model.eval()
        vb = MidBatches(run.tokenizer, self.mixture.val, self.o.device_batch_size, self.T, info.rank, info.world_size)
        self.val_bpb = evaluate_bpb(run.model, vb, self.eval_steps, self.token_bytes)
        run.model.train()
        self.min_val_bpb = min(self.min_val_bpb, self.val_bpb)
        run.print(f"step {step:05d} | validation bpb: {self.val_bpb:.4f}")
        return {"val_bpb": self.val_bpb}

    def loop_state(self) -> dict[str, Any]:
        return {"val_bpb": self.val_bpb, "min_val_bpb": self.min_val_bpb if self.min_val_bpb != float("inf") else None}

    def state(self) -> dict[str, Any]:
        return {"progress": self.progress, "val_loss": self.val_bpb, "val_bpb": self.val_bpb,
                "metrics": {"min_val_bpb": self.loop_state()["min_val_bpb"]}, "data": self.mixture.to_dict()}

    def done_line(self, run: Run) -> str:
        mv = self.loop_state()["min_val_bpb"]
        return f"done: {run.step} steps" + (f"; min val bpb {mv:.4f}" if mv is not None else "") + f"; checkpoint {run.directory}"


def mid(opts: MidOptions, home: Any = None) -> StageResult:
    """Mid-train the base model; see the module docstring."""
    return run_stage(Mid, opts, home)
