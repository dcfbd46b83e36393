"""Mid-training (`nanoctl mid`): nanochat OLD mid_train, continuing the base model on conversations.

- Data: nanochat's mid mixture (SmolTalk, MMLU auxiliary_train, GSM8K, identity x2, SimpleSpelling 200K,
  SpellingBee 80K), whichever sources are available (the rest are listed as missing), and/or
  `--data FILE.jsonl`. Val: SmolTalk test, MMLU test[:5200], GSM8K test[:420] (or a held-out slice).
- Rendered conversations are concatenated into one token stream and cut into B x T blocks: nothing is
  cropped (a long conversation simply spans blocks) and the loss covers every token, as nanochat.
- Horizon: one epoch over the mixture (`--num-iterations -1`) or a fixed number of steps.
- LR: constant for the first 80% of progress, then linearly to 0. Muon momentum 0.85 -> 0.95 over 300 steps.
- Val bpb every `eval_every` steps. Resume restarts the stream at the next unread conversation (the partly
  used block is skipped, never repeated), like the pretraining loader.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nanoctl.errors import Interrupted, NanoctlError, UsageError
from nanoctl.train.post import RENDER_ALL, PostOptions, StageResult, say

GPU_DEFAULTS: dict[str, Any] = dict(
    device_batch_size=32, total_batch_size=524288, num_iterations=-1, eval_every=150, eval_tokens=20 * 524288
)
CPU_PRESET: dict[str, Any] = dict(
    device_batch_size=4, total_batch_size=-1, num_iterations=30, eval_every=15, eval_tokens=-1
)


@dataclass
class MidOptions(PostOptions):
    """Options of `nanoctl mid`. None = device default (GPU_DEFAULTS on CUDA, else CPU_PRESET)."""

    data_dir: str | None = None
    data: list[str] = field(default_factory=list)
    mix: bool = False
    num_iterations: int | None = None  # -1 = one epoch over the mixture
    device_batch_size: int | None = None
    total_batch_size: int | None = None  # tokens per step; -1 = one micro-batch per process
    max_seq_len: int | None = None  # default: the model's context
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.0
    init_lr_frac: float = 1.0
    eval_every: int | None = None
    eval_tokens: int | None = None  # -1 = 4 micro-batches per process
    val_holdout: int | None = None
    compile: str = "auto"  # fixed (B, T) blocks: compiling on CUDA pays off
    train_task: Any = None  # library only: a Task instead of the mixture
    val_task: Any = None


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
        self.rendered = 0

    @property
    def progress(self) -> float:
        """Fraction of this rank's epoch read so far."""
        return self.cursor / self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def __next__(self) -> tuple[Any, Any]:
        import torch

        needed = self.B * self.T + 1
        while len(self.buffer) < needed:
            index = self.rank + (self.cursor % self.per_epoch) * self.world
            ids, _ = self.tokenizer.render_conversation(self.task[index], max_tokens=RENDER_ALL)
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


def mid(opts: MidOptions) -> StageResult:
    """Mid-train the base model; see the module docstring."""
    from nanoctl.train.post import run_stage

    return run_stage("mid", opts, _run)


def _run(opts: MidOptions, info: Any, wall0: float) -> StageResult:
    import torch

    from nanoctl.device import resolve_device
    from nanoctl.dist import all_reduce_mean
    from nanoctl.tasks.mixtures import Mixture, build_mixture
    from nanoctl.train import loop as L
    from nanoctl.train import post as P

    device = info.device if info is not None else resolve_device(opts.device)
    world = info.world_size if info is not None else opts.nproc_per_node * opts.nnodes
    master = info is None or info.is_master
    table = GPU_DEFAULTS if device.type == "cuda" else CPU_PRESET
    v = {k: (getattr(opts, k) if getattr(opts, k) is not None else d) for k, d in table.items()}
    ref = P.resolve_parent("mid", opts)
    parent_meta = P.read_parent_meta(ref)
    ctx = int(parent_meta["model_config"]["sequence_len"])
    T = opts.max_seq_len or ctx
    if T > ctx:
        raise UsageError(
            f"--max-seq-len {T} is longer than the model's context ({ctx})",
            f"use --max-seq-len {ctx} or less",
        )
    B = v["device_batch_size"]
    if B < 1:
        raise UsageError(f"--device-batch-size must be >= 1, got {B}")
    per_step = B * T * world
    total = v["total_batch_size"] if v["total_batch_size"] > 0 else per_step
    if total % per_step:
        raise UsageError(
            f"--total-batch-size {total:,} is not a multiple of --device-batch-size x context x processes = {B} x {T} x {world} = {per_step:,}",
            f"use --total-batch-size {max(1, round(total / per_step)) * per_step} or change --device-batch-size",
        )
    grad_accum = total // per_step
    eval_tokens = v["eval_tokens"] if v["eval_tokens"] > 0 else 4 * per_step
    eval_steps = max(1, eval_tokens // per_step)

    if opts.train_task is not None:
        mixture = Mixture(
            opts.train_task,
            opts.val_task if opts.val_task is not None else opts.train_task,
            val_note="library-provided tasks",
        )
    else:
        mixture = build_mixture(
            "mid",
            data_dir=opts.data_dir,
            home=opts.home,
            data=opts.data,
            mix=opts.mix,
            val_holdout=opts.val_holdout,
        )
    iters = v["num_iterations"] if v["num_iterations"] and v["num_iterations"] > 0 else -1
    horizon = (
        f"{iters:,} steps" + (" (CPU preset)" if opts.num_iterations is None else "")
        if iters > 0
        else f"one epoch over {len(mixture.train):,} conversations (ends when the stream wraps)"
    )
    tag = P.output_tag(opts, ref)
    plan = [
        f"mid: {ref.stage}/{ref.tag}@{ref.step} -> checkpoints/mid/{tag}",
        f"preset: {'gpu' if device.type == 'cuda' else 'cpu'} defaults; context {T} tokens",
        f"batch: {total:,} tokens/step = {B} rows x {T} tokens x {world} process(es) x {grad_accum} grad accum step(s)"
        " (conversations concatenated, no padding, no cropping)",
        f"horizon: {horizon}; LR x{opts.init_lr_frac}, constant then linear to 0 over the last 20%",
        f"LRs: embedding {opts.embedding_lr}, unembedding {opts.unembedding_lr}, matrix {opts.matrix_lr}, scalar {opts.scalar_lr}",
        f"eval: val bpb every {v['eval_every']} steps over {eval_steps * per_step:,} tokens",
        "data:",
        *mixture.summary_lines(),
    ]
    pre_bs = parent_meta.get("device_batch_size")
    if pre_bs is not None and B > pre_bs:
        plan.append(f"warning: base training used --device-batch-size {pre_bs}; {B} may not fit in memory")
    if (line := P.launch_line(opts)) is not None:
        plan.append(line)
    for line in plan:
        say(line, master)
    if opts.dry_run:
        return StageResult(
            "mid", tag, "", P.lineage(ref), 0, iters, skipped=True, plan=plan, data=mixture.to_dict()
        )

    resume_keys = {
        "parent": P.lineage(ref),
        "--max-seq-len": T,
        "--device-batch-size": B,
        "--total-batch-size": total,
        "world size": world,
        "num_iterations": iters,
        "train conversations": len(mixture.train),
        "lrs": [opts.embedding_lr, opts.unembedding_lr, opts.matrix_lr, opts.scalar_lr, opts.init_lr_frac],
    }
    out = P.prepare_output("mid", tag, resume_keys, opts, master)
    if out.done:
        return P.skipped_result("mid", tag, out, wall0)

    from nanoctl.evaluate.bpb import evaluate_bpb
    from nanoctl.tokenizer import load_token_bytes

    dtype, dtype_reason = P.setup_runtime(opts, info)
    say(f"compute dtype: {str(dtype).removeprefix('torch.')} ({dtype_reason})", master)
    model, tokenizer, _ = P.load_parent_model(ref, info, dtype, opts)
    token_bytes = load_token_bytes(opts.home, device=device)
    optimizer = P.setup_optimizer(model, opts, opts.init_lr_frac)
    resumed = P.restore_training(out, model, optimizer, info, master)
    loop_state, cursor = resumed.loop_state, resumed.cursor
    progress = float(resumed.meta.get("progress", 0.0))
    train_model = model
    if L.want_compile(opts.compile, device):
        model.prepare_flex_attention(T)
        train_model = torch.compile(model, dynamic=False)
    batches = MidBatches(tokenizer, mixture.train, B, T, info.rank, info.world_size, cursor)

    def run_eval() -> float:
        model.eval()
        vb = MidBatches(tokenizer, mixture.val, B, T, info.rank, info.world_size)
        bpb = evaluate_bpb(model, vb, eval_steps, token_bytes)
        model.train()
        return bpb

    start = out.resume_step or 0
    base_meta = {
        "stage": "mid",
        "model_config": model.config.to_dict(),
        "user_config": P.user_config(opts),
        "resume_keys": P.jsonable(resume_keys),
        "parent": P.lineage(ref),
        "device_batch_size": B,
        "max_seq_len": T,
        "total_batch_size": total,
    }
    est_steps = iters if iters > 0 else max(1, start + 1)
    run = P.StageRun(
        "mid",
        info,
        out,
        est_steps,
        start,
        base_meta,
        opts.keep_last,
        opts.wandb_run,
        {"options": P.user_config(opts)},
    )
    if master:
        from nanoctl.checkpoint import save_tokenizer_copy

        save_tokenizer_copy(out.directory, opts.home)
    ema = L.LossEMA.from_state(loop_state.ema)
    last_loss: float | None = None
    last_val = loop_state.val_bpb
    peak = None
    if device.type == "cuda":
        from nanoctl.device import peak_flops

        peak = peak_flops(device)
    flops_per_token = model.estimate_flops()
    step = start
    data_meta = mixture.to_dict()

    def save(final: bool) -> None:
        loop_state.step = step
        loop_state.ema = ema.state_dict()
        run.save(
            step,
            model,
            optimizer,
            final,
            num_iterations=step if final else iters,
            loader_state=L.gather_loader_state(batches.state_dict()),
            loop_state=loop_state.to_dict(),
            progress=progress,
            train_loss=last_loss,
            val_loss=last_val,
            val_bpb=last_val,
            data=data_meta,
        )

    try:
        with run.stop:
            while True:
                # all ranks agree on the end (any rank's stream wrapped), as nanochat's all-reduced last_step
                done = (iters > 0 and step >= iters) or (iters <= 0 and any_rank(batches.wrapped, device))
                fresh = not (step == start and out.resume_step is not None)
                if fresh and (done or (v["eval_every"] > 0 and step % v["eval_every"] == 0)):
                    last_val = run_eval()
                    loop_state.val_bpb = last_val
                    loop_state.min_val_bpb = min(loop_state.min_val_bpb, last_val)
                    run.print(f"step {step:05d} | validation bpb: {last_val:.4f}")
                    run.metrics.log(step, val_bpb=last_val)
                if done:
                    save(final=True)
                    break
                if opts.save_every > 0 and step % opts.save_every == 0 and step != start:
                    save(final=False)
                if run.stop.should_stop(device):
                    if step != start:
                        save(final=False)
                    raise Interrupted(
                        f"stopped at step {step}; checkpoint saved in {out.directory}",
                        "rerun the same command to resume",
                    )

                t0 = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for _ in range(grad_accum):
                    x, y = next(batches)
                    loss = train_model(x.to(device), y.to(device))
                    loss_sum += loss.detach().double()
                    (loss / grad_accum).backward()
                    if iters <= 0:
                        progress = max(progress, batches.progress)  # monotone, as nanochat
                if iters > 0:
                    progress = step / iters
                lrm = lr_multiplier(progress)
                L.apply_schedules(optimizer, lrm, momentum=muon_momentum(step))
                optimizer.step()
                model.zero_grad(set_to_none=True)
                train_loss = all_reduce_mean(float(loss_sum.item()) / grad_accum, device)
                dt = time.perf_counter() - t0
                if not math.isfinite(train_loss):
                    raise NanoctlError(
                        f"training loss became {train_loss} at step {step}",
                        "lower the learning rates or check the data",
                    )
                step += 1
                last_loss = train_loss
                smooth = ema.update(train_loss)
                if step - start > 10:
                    loop_state.total_training_time += dt
                run.step_times.append(dt)
                n_steps = iters if iters > 0 else max(step, round(step / max(progress, 1e-9)))
                mfu = 100 * flops_per_token * total / dt / (peak * world) if peak else None
                run.reporter.step(
                    L.StepLine(
                        step,
                        n_steps,
                        smooth,
                        lrm,
                        dt,
                        total / dt,
                        mfu,
                        loop_state.total_training_time,
                        run.eta(n_steps - step),
                        extra=f"data {100 * batches.progress:.2f}%",
                    ),
                    advance_to=step,
                )
                run.metrics.log(
                    step,
                    loss=train_loss,
                    loss_ema=smooth,
                    lrm=lrm,
                    dt=dt,
                    tok_per_sec=total / dt,
                    mfu=mfu,
                    progress=progress,
                )
    finally:
        run.close()

    say(
        f"done: {step} steps; min val bpb {loop_state.min_val_bpb:.4f}; checkpoint {out.directory}"
        if math.isfinite(loop_state.min_val_bpb)
        else f"done: {step} steps; checkpoint {out.directory}",
        master,
    )
    return StageResult(
        stage="mid",
        model_tag=tag,
        checkpoint_dir=str(out.directory),
        parent=P.lineage(ref),
        final_step=step,
        num_iterations=step,
        final_loss=last_loss,
        val_loss=last_val,
        metrics={
            "min_val_bpb": None if not math.isfinite(loop_state.min_val_bpb) else loop_state.min_val_bpb
        },
        data=data_meta,
        total_training_time=loop_state.total_training_time,
        wall_time=time.perf_counter() - wall0,
        resumed_from=out.resume_step,
        plan=plan,
    )


def any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when `flag` is True on any rank."""
    from nanoctl.dist import all_reduce_max

    return all_reduce_max(1.0 if flag else 0.0, device) > 0
