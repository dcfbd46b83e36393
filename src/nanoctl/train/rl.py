"""Reinforcement learning (`nanoctl rl`): nanochat's chat_rl, "GRPO" simplified to REINFORCE.

- On-policy: each step takes `examples_per_step` questions (across ranks); each gets `num_samples`
  rollouts from `Engine.generate_batch` (chunks of `device_batch_size`, T=1.0, top-k 50, seeds
  hash((step, example, chunk))), scored by the task's `reward` (GSM8K: 1 if the `####` answer matches).
- Advantage = reward - mean reward of the question's group (no std division, no KL, no ratio/clip).
- Loss = -sum(logp x advantage) over sampled tokens only (prompt and forced tool outputs are masked),
  divided by the number of valid tokens x passes x examples per rank (token-level, DAPO style).
- LR = initial_lr x init_lr_frac (0.05) x (1 - step/num_steps). Every `eval_every` steps: pass@1..k on
  held-out questions (the task's test split, else the tail of the train split), k = device batch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from nanoctl.errors import Interrupted, NanoctlError, UsageError
from nanoctl.train.post import PostOptions, StageResult, say

GPU_DEFAULTS: dict[str, Any] = dict(
    num_iterations=-1,
    device_batch_size=8,
    examples_per_step=16,
    num_samples=16,
    max_new_tokens=256,
    eval_every=60,
    eval_examples=400,
    save_every=60,
)
CPU_PRESET: dict[str, Any] = dict(
    num_iterations=10,
    device_batch_size=4,
    examples_per_step=2,
    num_samples=4,
    max_new_tokens=48,
    eval_every=5,
    eval_examples=4,
    save_every=-1,
)


@dataclass
class RLOptions(PostOptions):
    """Options of `nanoctl rl`. None = device default (GPU_DEFAULTS on CUDA, else CPU_PRESET)."""

    task: str = "GSM8K"
    data_dir: str | None = None
    num_epochs: int = 1
    num_iterations: int | None = None  # -1 = num_epochs over the train split
    device_batch_size: int | None = None
    examples_per_step: int | None = None
    num_samples: int | None = None
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = 50
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.0
    init_lr_frac: float = 0.05
    eval_every: int | None = None
    eval_examples: int | None = None
    save_every: int | None = None  # type: ignore[assignment]  # None = device default (60 on CUDA)
    train_task: Any = None  # library only: a Task with a reward instead of --task
    val_task: Any = None


def pass_at_k(
    model: Any,
    engine: Any,
    tokenizer: Any,
    task: Any,
    max_examples: int,
    k: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    info: Any,
) -> list[float]:
    """Fraction of problems solved by any of the first j samples, j = 1..k (ranks stride problems)."""
    import torch

    n = min(max_examples, len(task))
    hits = torch.zeros(k + 1, dtype=torch.float64, device=info.device)  # [pass@1..k, count]
    model.eval()
    for idx in range(info.rank, n, info.world_size):
        conv = task[idx]
        tokens = tokenizer.render_for_completion(conv)
        if len(tokens) >= engine.context_len:
            continue
        seqs, _ = engine.generate_batch(
            tokens, num_samples=k, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=idx
        )
        outcomes = [bool(task.evaluate(conv, tokenizer.decode(s[len(tokens) :]))) for s in seqs]
        for j in range(1, k + 1):
            hits[j - 1] += float(any(outcomes[:j]))
        hits[k] += 1
    model.train()
    if info.distributed:
        torch.distributed.all_reduce(hits)
    count = float(hits[k])
    return [float(h / count) if count else float("nan") for h in hits[:k]]


def rl(opts: RLOptions) -> StageResult:
    """Run RL on a verifiable task; see the module docstring."""
    from nanoctl.train.post import run_stage

    return run_stage("rl", opts, _run)


def _tasks(opts: RLOptions, eval_examples: int) -> tuple[Any, Any, str]:
    from nanoctl.tasks import get_task
    from nanoctl.tasks.common import Task, TaskSlice

    if opts.train_task is not None:
        return (
            opts.train_task,
            opts.val_task if opts.val_task is not None else opts.train_task,
            "library-provided tasks",
        )
    train = get_task(opts.task, split="train", data_dir=opts.data_dir, home=opts.home)
    if type(train).evaluate is Task.evaluate:  # training-only data: nothing to reward
        raise UsageError(
            f"--task {opts.task} has no reward", "use a scored task such as GSM8K or SpellingBee"
        )
    try:
        val = get_task(opts.task, split="test", data_dir=opts.data_dir, home=opts.home)
        return train, val, f"{opts.task} train ({len(train):,}) / test ({len(val):,})"
    except NanoctlError:
        k = min(eval_examples, max(1, len(train) // 10))
        n = len(train)
        return (
            TaskSlice(train, stop=n - k),
            TaskSlice(train, start=n - k),
            f"{opts.task} train ({n - k:,}); test split unavailable: held out the last {k} train questions",
        )


def _run(opts: RLOptions, info: Any, wall0: float) -> StageResult:
    import torch

    from nanoctl.device import resolve_device
    from nanoctl.train import loop as L
    from nanoctl.train import post as P

    device = info.device if info is not None else resolve_device(opts.device)
    world = info.world_size if info is not None else opts.nproc_per_node * opts.nnodes
    master = info is None or info.is_master
    table = GPU_DEFAULTS if device.type == "cuda" else CPU_PRESET
    v = {k: (getattr(opts, k) if getattr(opts, k) is not None else d) for k, d in table.items()}
    B, eps, ns = v["device_batch_size"], v["examples_per_step"], v["num_samples"]
    for name, val in (
        ("--device-batch-size", B),
        ("--examples-per-step", eps),
        ("--num-samples", ns),
        ("--max-new-tokens", v["max_new_tokens"]),
    ):
        if val < 1:
            raise UsageError(f"{name} must be >= 1, got {val}")
    if ns % B:
        raise UsageError(
            f"--num-samples {ns} is not a multiple of --device-batch-size {B}",
            f"use --num-samples {max(1, ns // B) * B}",
        )
    if eps % world:
        raise UsageError(
            f"--examples-per-step {eps} is not a multiple of the {world} process(es)",
            f"use --examples-per-step {max(1, eps // world) * world}",
        )
    per_rank = eps // world
    ref = P.resolve_parent("rl", opts)
    train_task, val_task, data_note = _tasks(opts, v["eval_examples"])
    iters = v["num_iterations"]
    if iters is None or iters <= 0:
        iters = (len(train_task) // eps) * opts.num_epochs
        horizon = f"{opts.num_epochs} epoch(s) of {len(train_task):,} questions"
    else:
        horizon = "--num-iterations" + (" (CPU preset)" if opts.num_iterations is None else "")
    if iters < 1:
        raise UsageError(f"{len(train_task)} questions make 0 steps of {eps}", "lower --examples-per-step")
    tag = P.output_tag(opts, ref)
    plan = [
        f"rl: {ref.stage}/{ref.tag}@{ref.step} -> checkpoints/rl/{tag}",
        f"data: {data_note}",
        f"rollouts: {eps} questions/step x {ns} samples = {eps * ns} sequences/step, generated {B} at a time"
        f" (T={opts.temperature}, top-k {opts.top_k}, <= {v['max_new_tokens']} new tokens)",
        f"horizon ({horizon}): {iters:,} steps; LR x{opts.init_lr_frac} decaying linearly to 0",
        f"eval: pass@1..{B} on {v['eval_examples']} held-out questions every {v['eval_every']} steps",
    ]
    if (line := P.launch_line(opts)) is not None:
        plan.append(line)
    for line in plan:
        say(line, master)
    if opts.dry_run:
        return StageResult(
            "rl", tag, "", P.lineage(ref), 0, iters, skipped=True, plan=plan, data={"note": data_note}
        )

    resume_keys = {
        "parent": P.lineage(ref),
        "task": opts.task if opts.train_task is None else getattr(opts.train_task, "name", "custom"),
        "--device-batch-size": B,
        "--examples-per-step": eps,
        "--num-samples": ns,
        "world size": world,
        "num_iterations": iters,
        "lrs": [opts.embedding_lr, opts.unembedding_lr, opts.matrix_lr, opts.scalar_lr, opts.init_lr_frac],
    }
    out = P.prepare_output("rl", tag, resume_keys, opts, master)
    if out.done:
        return P.skipped_result("rl", tag, out, wall0)

    from nanoctl.engine import Engine

    dtype, dtype_reason = P.setup_runtime(opts, info)
    say(f"compute dtype: {str(dtype).removeprefix('torch.')} ({dtype_reason})", master)
    model, tokenizer, _ = P.load_parent_model(ref, info, dtype, opts)
    engine = Engine(model, tokenizer)
    pad = tokenizer.encode_special("<|assistant_end|>")
    optimizer = P.setup_optimizer(model, opts, opts.init_lr_frac)
    resumed = P.restore_training(out, model, optimizer, info, master)
    loop_state, cursor = resumed.loop_state, resumed.cursor
    rank_indices = list(range(info.rank, len(train_task), info.world_size))
    if not rank_indices:
        raise NanoctlError(f"not enough questions ({len(train_task)}) for {info.world_size} process(es)")

    @torch.no_grad()
    def rollout(step: int, idx: int) -> tuple[list[list[int]], Any, Any, Any] | None:
        """`num_samples` completions of question `idx`: (sequences, inputs, targets, rewards)."""
        conv = train_task[idx]
        tokens = tokenizer.render_for_completion(conv)
        if len(tokens) >= engine.context_len:
            return None  # the question alone fills the context: nothing to sample (counted, skipped)
        model.eval()
        seqs: list[list[int]] = []
        masks: list[list[int]] = []
        for chunk in range(ns // B):
            seed = hash((step, idx, chunk)) & 0x7FFFFFFF
            s, m = engine.generate_batch(
                tokens,
                num_samples=B,
                max_tokens=v["max_new_tokens"],
                temperature=opts.temperature,
                top_k=opts.top_k,
                seed=seed,
            )
            seqs += s
            masks += m
        model.train()
        rewards = [float(train_task.reward(conv, tokenizer.decode(s[len(tokens) :]))) for s in seqs]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
        mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long, device=device)
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        targets[mask[:, 1:] == 0] = -1  # train only on sampled tokens
        return seqs, inputs, targets, torch.tensor(rewards, dtype=torch.float32, device=device)

    start = out.resume_step or 0
    base_meta = {
        "stage": "rl",
        "model_config": model.config.to_dict(),
        "user_config": P.user_config(opts),
        "resume_keys": P.jsonable(resume_keys),
        "parent": P.lineage(ref),
        "num_iterations": iters,
    }
    run = P.StageRun(
        "rl",
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
    metrics: dict[str, Any] = dict((out.saved_meta or {}).get("metrics", {}))
    reward_history: list[float] = list(metrics.get("reward_history", []))
    step = start
    skipped_long = int(metrics.get("skipped_long_questions", 0))

    def save(final: bool) -> None:
        loop_state.step = step
        metrics["skipped_long_questions"] = skipped_long
        metrics["reward_history"] = reward_history
        run.save(
            step,
            model,
            optimizer,
            final,
            loader_state=L.gather_loader_state({"cursor": cursor}),
            loop_state=loop_state.to_dict(),
            metrics=metrics,
            data={"note": data_note},
        )

    from nanoctl.dist import all_reduce_mean

    try:
        with run.stop:
            while True:
                last = step == iters
                fresh = not (step == start and out.resume_step is not None)
                if fresh and v["eval_every"] > 0 and (last or step % v["eval_every"] == 0):
                    passk = pass_at_k(
                        model,
                        engine,
                        tokenizer,
                        val_task,
                        v["eval_examples"],
                        B,
                        v["max_new_tokens"],
                        1.0,
                        opts.top_k,
                        info,
                    )
                    metrics["pass@k"] = passk
                    run.print(
                        f"step {step:05d} | "
                        + ", ".join(f"pass@{k + 1}: {p:.4f}" for k, p in enumerate(passk))
                    )
                    run.metrics.log(step, **{f"pass@{k + 1}": p for k, p in enumerate(passk)})
                if last:
                    save(final=True)
                    break
                if v["save_every"] > 0 and step % v["save_every"] == 0 and step != start:
                    save(final=False)
                if run.stop.should_stop(device):
                    if step != start:
                        save(final=False)
                    raise Interrupted(
                        f"stopped at step {step}/{iters}; checkpoint saved in {out.directory}",
                        "rerun the same command to resume",
                    )

                t0 = time.perf_counter()
                step_rewards: list[float] = []
                seq_lens: list[int] = []
                for _ in range(per_rank):
                    for _attempt in range(len(rank_indices)):
                        idx = rank_indices[cursor % len(rank_indices)]
                        cursor += 1
                        rolled = rollout(step, idx)
                        if rolled is not None:
                            break
                        skipped_long += 1
                    if rolled is None:
                        raise NanoctlError(
                            f"no {train_task.name} question fits the model's {engine.context_len}-token context",
                            "use a model with a longer context",
                        )
                    seqs, inputs_all, targets_all, rewards_all = rolled
                    advantages_all = rewards_all - rewards_all.mean()  # group baseline
                    passes = inputs_all.size(0) // B
                    for p in range(passes):
                        sl = slice(p * B, (p + 1) * B)
                        inputs, targets, adv = inputs_all[sl], targets_all[sl], advantages_all[sl]
                        nll = model(inputs, targets, loss_reduction="none").view_as(inputs)
                        logp = -nll  # 0 at masked positions (ignore_index)
                        pg = (logp * adv.unsqueeze(-1)).sum()
                        num_valid = (targets >= 0).sum().clamp(min=1)
                        loss = -pg / (num_valid * passes * per_rank)
                        loss.backward()
                    step_rewards.append(float(rewards_all.mean().item()))
                    seq_lens += [len(s) for s in seqs]
                mean_reward = all_reduce_mean(sum(step_rewards) / len(step_rewards), device)
                mean_len = all_reduce_mean(sum(seq_lens) / len(seq_lens), device)
                lrm = 1.0 - step / iters
                L.apply_schedules(optimizer, lrm)
                optimizer.step()
                model.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                if not math.isfinite(mean_reward):
                    raise NanoctlError(
                        f"reward became {mean_reward} at step {step}", "check the task's reward function"
                    )
                step += 1
                reward_history.append(mean_reward)
                if step - start > 10:
                    loop_state.total_training_time += dt
                run.step_times.append(dt)
                run.reporter.step(
                    f"step {step:05d}/{iters:05d} ({100 * step / iters:5.1f}%) | reward {mean_reward:.4f} | seq len {mean_len:.1f}"
                    f" | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | eta {L.format_duration(run.eta(iters - step))}",
                    advance_to=step,
                )
                run.metrics.log(step, reward=mean_reward, sequence_length=mean_len, lrm=lrm, dt=dt)
    finally:
        run.close()

    metrics["reward_history"] = reward_history
    metrics["skipped_long_questions"] = skipped_long
    if skipped_long:
        say(
            f"note: skipped {skipped_long} question(s) longer than the {engine.context_len}-token context",
            master,
        )
    say(
        f"done: {iters} steps; last reward {reward_history[-1] if reward_history else float('nan'):.4f}; checkpoint {out.directory}",
        master,
    )
    return StageResult(
        stage="rl",
        model_tag=tag,
        checkpoint_dir=str(out.directory),
        parent=P.lineage(ref),
        final_step=step,
        num_iterations=iters,
        metrics=metrics,
        data={"note": data_note},
        total_training_time=loop_state.total_training_time,
        wall_time=time.perf_counter() - wall0,
        resumed_from=out.resume_step,
        plan=plan,
    )
