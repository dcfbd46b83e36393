"""Supervised fine-tuning (`nanoctl sft`): nanochat OLD chat_sft.

- Starts from the latest mid checkpoint (else base). Data: nanochat's OLD SFT mixture (ARC-Easy/Challenge
  train, GSM8K, SmolTalk[:10K], identity, SimpleSpelling 300, SpellingBee 300), whatever is available,
  and/or `--data FILE.jsonl` (alone, or joined with `--mix`).
- One conversation per row, padded with `<|assistant_end|>` to the longest row of the micro-batch (no
  packing across conversations); targets are -1 wherever the render mask is 0 (prompts, tool outputs,
  padding), so the loss covers only assistant tokens. Conversations longer than the context are cropped to
  context+1 tokens (counted), and a row left with no supervised token is dropped (counted): no NaN loss.
- Schedule: LR = initial_lr x init_lr_frac (0.02; CPU preset 1.0) x (1 - step/num_iterations); Muon momentum fixed.
- Evals: val loss every `eval_every` steps; quick multiple-choice accuracy (MMLU, ARC-Easy by default)
  every `eval_metrics_every` steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nanoctl.errors import Interrupted, NanoctlError, UsageError
from nanoctl.train.post import PostOptions, RenderStats, StageResult, render_cropped, say

GPU_DEFAULTS: dict[str, Any] = dict(
    device_batch_size=4,
    target_examples_per_step=32,
    num_iterations=-1,
    eval_every=100,
    eval_steps=100,
    eval_metrics_every=200,
    eval_metrics_max_problems=1024,
    init_lr_frac=0.02,  # nanochat
)
CPU_PRESET: dict[str, Any] = dict(
    device_batch_size=4,
    target_examples_per_step=8,
    num_iterations=30,
    eval_every=15,
    eval_steps=4,
    eval_metrics_every=30,
    eval_metrics_max_problems=16,
    # A tiny model given 30 steps barely moves at 2% of the LR: at 1.0 the d4 CPU model's val loss is
    # 0.90 instead of 5.2 and it answers "Who are you?" from the identity data (bench/RESULTS.md).
    init_lr_frac=1.0,
)


@dataclass
class SFTOptions(PostOptions):
    """Options of `nanoctl sft`. None = device default (GPU_DEFAULTS on CUDA, else CPU_PRESET)."""

    data_dir: str | None = None
    data: list[str] = field(default_factory=list)
    mix: bool = False
    num_epochs: int = 1
    num_iterations: int | None = None  # -1 = num_epochs over the mixture
    device_batch_size: int | None = None
    target_examples_per_step: int | None = None
    max_seq_len: int | None = None  # default: the model's context
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.0
    init_lr_frac: float | None = None  # None: device default (0.02 as nanochat; CPU preset 1.0)
    eval_every: int | None = None
    eval_steps: int | None = None
    eval_metrics_every: int | None = None
    eval_metrics_max_problems: int | None = None
    metric_tasks: list[str] = field(default_factory=lambda: ["MMLU", "ARC-Easy"])
    val_holdout: int | None = None
    # library only: train/validate on these Task objects instead of the mixture
    train_task: Any = None
    val_task: Any = None


class SFTBatches:
    """Padded per-conversation micro-batches. Rank r reads conversations r, r+W, ...; `cursor` counts this
    rank's consumed positions so a resume continues exactly at the next conversation."""

    def __init__(
        self,
        tokenizer: Any,
        task: Any,
        batch_size: int,
        max_seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        cursor: int = 0,
        stats: RenderStats | None = None,
    ) -> None:
        self.tokenizer, self.task = tokenizer, task
        self.batch_size, self.max_len = batch_size, max_seq_len + 1  # +1: inputs and targets shift by one
        self.rank, self.world = rank, world_size
        self.cursor = cursor
        self.stats = stats or RenderStats()
        self.pad = tokenizer.encode_special("<|assistant_end|>")
        self.per_epoch = len(range(rank, len(task), world_size))
        if self.per_epoch == 0:
            raise NanoctlError(f"not enough conversations ({len(task)}) for {world_size} process(es)")

    @property
    def epoch(self) -> float:
        return self.cursor / self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def _next_row(self) -> tuple[list[int], list[int]]:
        for _ in range(self.per_epoch + 1):
            index = self.rank + (self.cursor % self.per_epoch) * self.world
            self.cursor += 1
            ids, mask = render_cropped(self.tokenizer, self.task[index], self.max_len, self.stats)
            if any(mask[1:]):
                return ids, mask
            self.stats.dropped += 1  # nothing to learn (e.g. the prompt alone fills the context)
        raise NanoctlError("no conversation has an assistant token within the context", "raise --max-seq-len")

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> tuple[Any, Any]:
        import torch

        width = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), width), self.pad, dtype=torch.long)
        targets = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            t = torch.tensor(ids, dtype=torch.long)
            inputs[i, :n] = t[:-1]
            row_targets = t[1:].clone()
            row_targets[torch.tensor(mask[1:], dtype=torch.bool).logical_not()] = -1
            targets[i, :n] = row_targets
        return inputs, targets

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def __next__(self) -> tuple[Any, Any]:
        return self.collate([self._next_row() for _ in range(self.batch_size)])


def sft(opts: SFTOptions) -> StageResult:
    """Fine-tune on conversations; see the module docstring."""
    from nanoctl.train.post import run_stage

    return run_stage("sft", opts, _run)


def _defaults(opts: SFTOptions, device_type: str) -> dict[str, Any]:
    table = GPU_DEFAULTS if device_type == "cuda" else CPU_PRESET
    return {k: (getattr(opts, k) if getattr(opts, k) is not None else v) for k, v in table.items()}


def _run(opts: SFTOptions, info: Any, wall0: float) -> StageResult:
    import torch

    from nanoctl.device import resolve_device
    from nanoctl.dist import all_reduce_mean
    from nanoctl.tasks.mixtures import Mixture, build_mixture
    from nanoctl.train import loop as L
    from nanoctl.train import post as P

    device = info.device if info is not None else resolve_device(opts.device)
    world = info.world_size if info is not None else opts.nproc_per_node * opts.nnodes
    master = info is None or info.is_master
    v = _defaults(opts, device.type)
    ref = P.resolve_parent("sft", opts)
    parent_meta = P.read_parent_meta(ref)
    ctx = int(parent_meta["model_config"]["sequence_len"])
    T = opts.max_seq_len or ctx
    if T > ctx:
        raise UsageError(
            f"--max-seq-len {T} is longer than the model's context ({ctx})",
            f"use --max-seq-len {ctx} or less",
        )
    B = v["device_batch_size"]
    target = v["target_examples_per_step"]
    for name, val in (
        ("--device-batch-size", B),
        ("--target-examples-per-step", target),
        ("--num-epochs", opts.num_epochs),
    ):
        if val < 1:
            raise UsageError(f"{name} must be >= 1, got {val}")
    if target % (B * world):
        raise UsageError(
            f"--target-examples-per-step {target} is not a multiple of --device-batch-size x processes = {B} x {world}",
            f"use --target-examples-per-step {max(1, round(target / (B * world))) * B * world}",
        )
    grad_accum = target // (B * world)

    # data
    if opts.train_task is not None:
        train, val = opts.train_task, opts.val_task if opts.val_task is not None else opts.train_task
        mixture = Mixture(train, val, val_note="library-provided tasks")
    else:
        mixture = build_mixture(
            "sft",
            data_dir=opts.data_dir,
            home=opts.home,
            data=opts.data,
            mix=opts.mix,
            val_holdout=opts.val_holdout,
        )
    train_task, val_task = mixture.train, mixture.val
    iters = v["num_iterations"]
    if iters is None or iters <= 0:
        iters = (len(train_task) // target) * opts.num_epochs
        horizon = f"{opts.num_epochs} epoch(s) of {len(train_task):,} conversations"
    else:
        horizon = "--num-iterations" + (" (CPU preset)" if opts.num_iterations is None else "")
    if iters < 1:
        raise UsageError(
            f"{len(train_task)} training conversations make 0 steps of {target} examples",
            "lower --target-examples-per-step or add data",
        )
    tag = P.output_tag(opts, ref)
    plan = [
        f"sft: {P.lineage(ref)['stage']}/{ref.tag}@{ref.step} -> checkpoints/sft/{tag}",
        f"preset: {'gpu' if device.type == 'cuda' else 'cpu'} defaults; context {T} tokens",
        f"batch: {target} conversations/step = {B} rows x {world} process(es) x {grad_accum} grad accum step(s)"
        " (rows padded per micro-batch)",
        f"horizon ({horizon}): {iters:,} steps; LR x{v['init_lr_frac']} decaying linearly to 0",
        f"LRs: embedding {opts.embedding_lr}, unembedding {opts.unembedding_lr}, matrix {opts.matrix_lr},"
        f" scalar {opts.scalar_lr} (AdamW ones scaled by (width/768)^-0.5)",
        f"eval: val loss every {v['eval_every']} steps ({v['eval_steps']} batches); accuracy of"
        f" {', '.join(opts.metric_tasks) or 'no task'} every {v['eval_metrics_every']} steps"
        f" (max {v['eval_metrics_max_problems']} problems)",
        "data:",
        *mixture.summary_lines(),
    ]
    if (line := P.launch_line(opts)) is not None:
        plan.append(line)
    for line in plan:
        say(line, master)
    if opts.dry_run:
        return StageResult(
            "sft", tag, "", P.lineage(ref), 0, iters, skipped=True, plan=plan, data=mixture.to_dict()
        )

    resume_keys = {
        "parent": P.lineage(ref),
        "--max-seq-len": T,
        "--device-batch-size": B,
        "--target-examples-per-step": target,
        "world size": world,
        "num_iterations": iters,
        "train conversations": len(train_task),
        "lrs": [opts.embedding_lr, opts.unembedding_lr, opts.matrix_lr, opts.scalar_lr, v["init_lr_frac"]],
    }
    out = P.prepare_output("sft", tag, resume_keys, opts, master)
    if out.done:
        return P.skipped_result("sft", tag, out, wall0)

    dtype, dtype_reason = P.setup_runtime(opts, info)
    say(f"compute dtype: {str(dtype).removeprefix('torch.')} ({dtype_reason})", master)
    model, tokenizer, _ = P.load_parent_model(ref, info, dtype, opts)
    optimizer = P.setup_optimizer(model, opts, v["init_lr_frac"])
    resumed = P.restore_training(out, model, optimizer, info, master)
    loop_state, cursor = resumed.loop_state, resumed.cursor
    stats = RenderStats(**(resumed.meta.get("data", {}).get("render") or {}))
    scaler = L.LossScaler(dtype == torch.float16, loop_state.loss_scaler)  # fp16 only, as nanochat
    train_model = torch.compile(model, dynamic=True) if L.want_compile(opts.compile, device) else model

    batches = SFTBatches(tokenizer, train_task, B, T, info.rank, info.world_size, cursor, stats)
    metric_tasks, skipped_tasks = P.load_metric_tasks(opts.metric_tasks, opts.data_dir, opts.home)
    for s in skipped_tasks:
        say(f"note: quick accuracy skips {s}", master)

    def val_loss() -> float:
        """Token-weighted mean loss over `eval_steps` val batches (all ranks)."""
        vb = SFTBatches(tokenizer, val_task, B, T, info.rank, info.world_size)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        model.eval()
        with torch.no_grad():
            for _ in range(v["eval_steps"]):
                x, y = next(vb)
                x, y = x.to(device), y.to(device)
                sums[0] += model(x, y, loss_reduction="sum").double()
                sums[1] += (y >= 0).sum()
        model.train()
        if info.distributed:
            torch.distributed.all_reduce(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    start = out.resume_step or 0
    base_meta = {
        "stage": "sft",
        "model_config": model.config.to_dict(),
        "user_config": P.user_config(opts),
        "resume_keys": P.jsonable(resume_keys),
        "parent": P.lineage(ref),
        "device_batch_size": B,
        "max_seq_len": T,
        "num_iterations": iters,
    }
    run = P.StageRun(
        "sft",
        info,
        out,
        iters,
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
    last_val: float | None = (out.saved_meta or {}).get("val_loss")
    accuracies: dict[str, float] = dict((out.saved_meta or {}).get("metrics", {}))
    step = start

    def data_meta() -> dict[str, Any]:
        return {**mixture.to_dict(), "render": stats.to_dict()}

    def save(final: bool) -> None:
        loop_state.step = step
        loop_state.ema = ema.state_dict()
        run.save(
            step,
            model,
            optimizer,
            final,
            loader_state=L.gather_loader_state(batches.state_dict()),
            loop_state=loop_state.to_dict(),
            train_loss=last_loss,
            val_loss=last_val,
            metrics=accuracies,
            data=data_meta(),
        )

    try:
        with run.stop:
            while True:
                last = step == iters
                if last:
                    save(final=True)
                elif opts.save_every > 0 and step % opts.save_every == 0 and step != start:
                    save(final=False)
                fresh = not (step == start and out.resume_step is not None)
                if fresh and (last or (v["eval_every"] > 0 and step % v["eval_every"] == 0)):
                    last_val = val_loss()
                    run.print(f"step {step:05d} | validation loss: {last_val:.6f}")
                    run.metrics.log(step, val_loss=last_val)
                if (
                    fresh
                    and metric_tasks
                    and (
                        last
                        or (v["eval_metrics_every"] > 0 and step % v["eval_metrics_every"] == 0 and step > 0)
                    )
                ):
                    for name, task in metric_tasks.items():
                        accuracies[name] = categorical_acc = P.categorical_accuracy(
                            model, tokenizer, task, v["eval_metrics_max_problems"], B, info
                        )
                        run.print(f"step {step:05d} | {name} accuracy: {categorical_acc:.4f}")
                    run.metrics.log(step, **{f"acc/{k}": a for k, a in accuracies.items()})
                if last:
                    break
                if run.stop.should_stop(device):
                    if step != start:
                        save(final=False)
                    raise Interrupted(
                        f"stopped at step {step}/{iters}; checkpoint saved in {out.directory}",
                        "rerun the same command to resume",
                    )

                t0 = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                tokens = 0
                for _ in range(grad_accum):
                    x, y = next(batches)
                    x, y = x.to(device), y.to(device)
                    n_valid = (y >= 0).sum()
                    # sum / count (not reduction="mean"): a micro-batch without targets gives 0, never NaN
                    loss = train_model(x, y, loss_reduction="sum") / n_valid.clamp(min=1)
                    loss_sum += loss.detach().double()
                    tokens += int(n_valid.item())
                    scaler.scale_loss(loss / grad_accum).backward()
                lrm = 1.0 - step / iters
                L.apply_schedules(optimizer, lrm)
                if scaler.unscale_and_check(optimizer):
                    optimizer.step()
                else:
                    say(f"step {step}: fp16 gradients overflowed; skipped, loss scale {scaler.scale:g}", master)
                model.zero_grad(set_to_none=True)
                loop_state.loss_scaler = scaler.state_dict()
                train_loss = all_reduce_mean(float(loss_sum.item()) / grad_accum, device)
                dt = time.perf_counter() - t0
                if not math.isfinite(train_loss):
                    raise NanoctlError(
                        f"training loss became {train_loss} at step {step}",
                        "lower --init-lr-frac or check the data",
                    )
                step += 1
                last_loss = train_loss
                smooth = ema.update(train_loss)
                if step - start > 10:
                    loop_state.total_training_time += dt
                run.step_times.append(dt)
                run.reporter.step(
                    L.StepLine(
                        step,
                        iters,
                        smooth,
                        lrm,
                        dt,
                        tokens * info.world_size / dt,
                        None,
                        loop_state.total_training_time,
                        run.eta(iters - step),
                        extra=f"epoch {batches.epoch:.2f}",
                    ),
                    advance_to=step,
                )
                run.metrics.log(
                    step,
                    loss=train_loss,
                    loss_ema=smooth,
                    lrm=lrm,
                    dt=dt,
                    supervised_tokens=tokens,
                    epoch=batches.epoch,
                )
    finally:
        run.close()

    data = data_meta()
    if master:  # the final checkpoint was written before the final evals: record their results too
        P.update_meta(out.directory, step, val_loss=last_val, metrics=accuracies)
    if stats.cropped or stats.dropped:
        say(
            f"note: {stats.cropped} conversation(s) cropped to the {T}-token context, {stats.dropped} dropped (no assistant token left)",
            master,
        )
    say(
        f"done: {iters} steps; final val loss {last_val if last_val is None else round(last_val, 4)}; checkpoint {out.directory}",
        master,
    )
    return StageResult(
        stage="sft",
        model_tag=tag,
        checkpoint_dir=str(out.directory),
        parent=P.lineage(ref),
        final_step=step,
        num_iterations=iters,
        final_loss=last_loss,
        val_loss=last_val,
        metrics=accuracies,
        data=data,
        total_training_time=loop_state.total_training_time,
        wall_time=time.perf_counter() - wall0,
        resumed_from=out.resume_step,
        plan=plan,
    )
