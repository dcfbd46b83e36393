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

from dataclasses import dataclass
from typing import Any

from nanoctl.engine import SamplingParams
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.options import DATA, OPTIMIZATION, OUTPUT, apply_preset, option
from nanoctl.train.parent import PostOptions, PostStage, lineage
from nanoctl.train.schedules import EVERY_OR_OFF
from nanoctl.train.stage import Plan, Run, StageResult, StepStats, run_stage


@dataclass
class RLOptions(PostOptions):
    """Options of `nanoctl rl`. None = the device preset (GPU_PRESET on CUDA, else CPU_PRESET)."""

    task: str = option("GSM8K", help="Task with a verifiable reward: GSM8K or SpellingBee.", panel=DATA)
    num_epochs: int = option(1, help="Epochs over the train split when --num-iterations is -1.", panel=OPTIMIZATION)
    num_iterations: int | None = option(None, help="Optimizer steps; -1 = --num-epochs over the train split.", panel=OPTIMIZATION)
    device_batch_size: int | None = option(None, help="Sequences per rollout/forward chunk per process.", panel=OPTIMIZATION)
    examples_per_step: int | None = option(None, help="Questions per optimizer step (across processes).", panel=OPTIMIZATION)
    num_samples: int | None = option(None, help="Rollouts per question.", panel=OPTIMIZATION)
    max_new_tokens: int | None = option(None, help="Longest rollout.", unit="tokens", panel=OPTIMIZATION)
    temperature: float = option(1.0, help="Rollout sampling temperature.", panel=OPTIMIZATION)
    top_k: int = option(50, help="Rollout top-k.", panel=OPTIMIZATION)
    init_lr_frac: float = option(0.05, help="Starting LR as a fraction of the LRs above.", panel=OPTIMIZATION)
    eval_every: int | None = option(
        None, help=f"pass@k every N steps and at the end ({EVERY_OR_OFF.rule}).", unit="steps", panel=OUTPUT
    )
    eval_examples: int | None = option(None, help="Held-out questions per pass@k eval.", panel=OUTPUT)
    save_every: int | None = option(
        None, help="Checkpoint every N steps; the final checkpoint is always saved (-1 or 0 = only at the end).",
        unit="steps", panel=OUTPUT,
    )
    train_task: Any = option(None, help="A Task with a reward to train on instead of --task.", cli=False)
    val_task: Any = option(None, help="A Task to evaluate pass@k on.", cli=False)


GPU_PRESET = RLOptions(
    num_iterations=-1, device_batch_size=8, examples_per_step=16, num_samples=16, max_new_tokens=256,
    eval_every=60, eval_examples=400, save_every=60,
)
CPU_PRESET = RLOptions(
    num_iterations=10, device_batch_size=4, examples_per_step=2, num_samples=4, max_new_tokens=48,
    eval_every=5, eval_examples=4, save_every=-1,
)
PRESETS = {"CUDA": GPU_PRESET, "CPU": CPU_PRESET}


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
        params = SamplingParams(temperature=temperature, top_k=top_k, max_tokens=max_new_tokens, seed=idx)
        seqs, _ = engine.generate_batch(tokens, params, num_samples=k)
        outcomes = [bool(task.evaluate(conv, tokenizer.decode(s[len(tokens) :]))) for s in seqs]
        for j in range(1, k + 1):
            hits[j - 1] += float(any(outcomes[:j]))
        hits[k] += 1
    model.train()
    if info.distributed:
        torch.distributed.all_reduce(hits)
    count = float(hits[k])
    return [float(h / count) if count else float("nan") for h in hits[:k]]


def _tasks(opts: RLOptions, eval_examples: int, home: Any) -> tuple[Any, Any, str]:
    from nanoctl.tasks import get_task
    from nanoctl.tasks.common import Task, TaskSlice

    if opts.train_task is not None:
        return (
            opts.train_task,
            opts.val_task if opts.val_task is not None else opts.train_task,
            "library-provided tasks",
        )
    train = get_task(opts.task, split="train", data_dir=opts.data_dir, home=home)
    if type(train).evaluate is Task.evaluate:  # training-only data: nothing to reward
        raise UsageError(
            f"--task {opts.task} has no reward", "use a scored task such as GSM8K or SpellingBee"
        )
    try:
        val = get_task(opts.task, split="test", data_dir=opts.data_dir, home=home)
        return train, val, f"{opts.task} train ({len(train):,}) / test ({len(val):,})"
    except NanoctlError:
        k = min(eval_examples, max(1, len(train) // 10))
        n = len(train)
        return (
            TaskSlice(train, stop=n - k),
            TaskSlice(train, start=n - k),
            f"{opts.task} train ({n - k:,}); test split unavailable: held out the last {k} train questions",
        )


class RL(PostStage):
    name = command = "rl"
    value_name = "reward"
    smooth = False
    compile_dynamic = None  # rollouts and variable-length passes: never compiled
    reports_mfu = False
    nan_hint = "check the task's reward function"
    every_flags = {"eval_every": EVERY_OR_OFF}

    def plan(self) -> Plan:
        o = self.o = apply_preset(self.opts, GPU_PRESET if self.device.type == "cuda" else CPU_PRESET)
        world = self.world_size
        B, eps, ns = o.device_batch_size, o.examples_per_step, o.num_samples
        for name, val in (("--device-batch-size", B), ("--examples-per-step", eps), ("--num-samples", ns),
                          ("--max-new-tokens", o.max_new_tokens)):
            if val < 1:
                raise UsageError(f"{name} must be >= 1, got {val}")
        if ns % B:
            raise UsageError(f"--num-samples {ns} is not a multiple of --device-batch-size {B}",
                             f"use --num-samples {max(1, ns // B) * B}")
        if eps % world:
            raise UsageError(f"--examples-per-step {eps} is not a multiple of the {world} process(es)",
                             f"use --examples-per-step {max(1, eps // world) * world}")
        self.per_rank = eps // world
        ref, _, tag = self.find_parent()
        self.train_task, self.val_task, self.data_note = _tasks(o, o.eval_examples, self.home)
        iters = o.num_iterations
        if iters is None or iters <= 0:
            iters = (len(self.train_task) // eps) * o.num_epochs
            horizon = f"{o.num_epochs} epoch(s) of {len(self.train_task):,} questions"
        else:
            horizon = "--num-iterations" + (" (CPU preset)" if self.opts.num_iterations is None else "")
        if iters < 1:
            raise UsageError(f"{len(self.train_task)} questions make 0 steps of {eps}", "lower --examples-per-step")
        lines = [
            f"rl: {ref.stage}/{ref.tag}@{ref.step} -> checkpoints/rl/{tag}",
            f"data: {self.data_note}",
            f"rollouts: {eps} questions/step x {ns} samples = {eps * ns} sequences/step, generated {B} at a time"
            f" (T={o.temperature}, top-k {o.top_k}, <= {o.max_new_tokens} new tokens)",
            f"horizon ({horizon}): {iters:,} steps; LR x{o.init_lr_frac} decaying linearly to 0",
            f"eval: pass@1..{B} on {o.eval_examples} held-out questions {EVERY_OR_OFF.describe(o.eval_every)}",
        ]
        resume_keys = {
            "parent": lineage(ref), "task": o.task if o.train_task is None else getattr(o.train_task, "name", "custom"),
            "--device-batch-size": B, "--examples-per-step": eps, "--num-samples": ns, "world size": world,
            "num_iterations": iters, "lrs": [o.embedding_lr, o.unembedding_lr, o.matrix_lr, o.scalar_lr, o.init_lr_frac],
        }
        return Plan(tag, iters, lines, resume_keys, {}, lineage(ref), details={"data": {"note": self.data_note}})

    def start(self, run: Run, saved: dict[str, Any], loader_state: dict[str, Any] | None) -> None:
        from nanoctl.engine import Engine

        self.engine = Engine(run.model, run.tokenizer)
        self.pad = run.tokenizer.encode_special("<|assistant_end|>")
        self.cursor = (loader_state or {}).get("cursor", 0)
        self.metrics: dict[str, Any] = dict(saved.get("metrics") or {})
        self.reward_history: list[float] = list(self.metrics.get("reward_history", []))
        self.skipped_long = int(self.metrics.get("skipped_long_questions", 0))
        self.rank_indices = list(range(run.info.rank, len(self.train_task), run.info.world_size))
        if not self.rank_indices:
            raise NanoctlError(f"not enough questions ({len(self.train_task)}) for {run.info.world_size} process(es)")

    def loader_state(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def rollout(self, run: Run, step: int, idx: int) -> tuple[list[list[int]], Any, Any, Any] | None:
        """`num_samples` completions of question `idx`: (sequences, inputs, targets, rewards)."""
        import torch

        conv = self.train_task[idx]
        tokens = run.tokenizer.render_for_completion(conv)
        if len(tokens) >= self.engine.context_len:
            return None  # the question alone fills the context: nothing to sample (counted, skipped)
        o, B = self.o, self.o.device_batch_size
        run.model.eval()
        seqs: list[list[int]] = []
        masks: list[list[int]] = []
        with torch.no_grad():
            for chunk in range(o.num_samples // B):
                seed = hash((step, idx, chunk)) & 0x7FFFFFFF
                params = SamplingParams(temperature=o.temperature, top_k=o.top_k, max_tokens=o.max_new_tokens, seed=seed)
                s, m = self.engine.generate_batch(tokens, params, num_samples=B)
                seqs += s
                masks += m
        run.model.train()
        rewards = [float(self.train_task.reward(conv, run.tokenizer.decode(s[len(tokens):]))) for s in seqs]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=run.device)
        mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long, device=run.device)
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        targets[mask[:, 1:] == 0] = -1  # train only on sampled tokens
        return seqs, inputs, targets, torch.tensor(rewards, dtype=torch.float32, device=run.device)

    def _next_rollout(self, run: Run, step: int) -> tuple[list[list[int]], Any, Any, Any]:
        for _attempt in range(len(self.rank_indices)):
            idx = self.rank_indices[self.cursor % len(self.rank_indices)]
            self.cursor += 1
            rolled = self.rollout(run, step, idx)
            if rolled is not None:
                return rolled
            self.skipped_long += 1
        raise NanoctlError(
            f"no {self.train_task.name} question fits the model's {self.engine.context_len}-token context",
            "use a model with a longer context",
        )

    def step(self, run: Run, step: int) -> StepStats:
        from nanoctl.dist import all_reduce_mean

        B, per_rank = self.o.device_batch_size, self.per_rank
        step_rewards: list[float] = []
        seq_lens: list[int] = []
        for _ in range(per_rank):
            seqs, inputs_all, targets_all, rewards_all = self._next_rollout(run, step)
            advantages_all = rewards_all - rewards_all.mean()  # group baseline
            passes = inputs_all.size(0) // B
            for p in range(passes):
                sl = slice(p * B, (p + 1) * B)
                inputs, targets, adv = inputs_all[sl], targets_all[sl], advantages_all[sl]
                logp = -run.model(inputs, targets, loss_reduction="none").view_as(inputs)  # 0 where masked
                num_valid = (targets >= 0).sum().clamp(min=1)
                run.backward(-(logp * adv.unsqueeze(-1)).sum() / (num_valid * passes * per_rank))
            step_rewards.append(float(rewards_all.mean().item()))
            seq_lens += [len(s) for s in seqs]
        self.mean_len = all_reduce_mean(sum(seq_lens) / len(seq_lens), run.device)
        return StepStats(sum(step_rewards) / len(step_rewards), sum(seq_lens) * run.info.world_size,
                         {"sequence_length": self.mean_len})

    def on_step(self, step: int, value: float) -> None:
        self.reward_history.append(value)

    def step_line(self, run: Run, step: int, num_steps: int, stats: StepStats, shown: float, lrm: float,
                  dt: float, mfu: float | None) -> str:
        from nanoctl.train.progress import format_duration

        return (f"step {step:05d}/{num_steps:05d} ({100 * step / num_steps:5.1f}%) | reward {shown:.4f}"
                f" | seq len {self.mean_len:.1f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms"
                f" | eta {format_duration(run.eta(num_steps - step))}")

    def evaluate(self, run: Run, step: int, last: bool) -> dict[str, Any]:
        o = self.o
        if not self.due("eval_every", step, last):
            return {}
        passk = pass_at_k(run.model, self.engine, run.tokenizer, self.val_task, o.eval_examples, o.device_batch_size,
                          o.max_new_tokens, 1.0, o.top_k, run.info)
        self.metrics["pass@k"] = passk
        run.print(f"step {step:05d} | " + ", ".join(f"pass@{k + 1}: {p:.4f}" for k, p in enumerate(passk)))
        return {f"pass@{k + 1}": p for k, p in enumerate(passk)}

    def state(self) -> dict[str, Any]:
        self.metrics["skipped_long_questions"] = self.skipped_long
        self.metrics["reward_history"] = self.reward_history
        return {"metrics": self.metrics, "data": {"note": self.data_note}}

    def done_line(self, run: Run) -> str:
        note = ""
        if self.skipped_long:
            note = f"note: skipped {self.skipped_long} question(s) longer than the {self.engine.context_len}-token context\n"
        last = self.reward_history[-1] if self.reward_history else float("nan")
        return note + f"done: {run.step} steps; last reward {last:.4f}; checkpoint {run.directory}"


def rl(opts: RLOptions, home: Any = None) -> StageResult:
    """Run RL on a verifiable task; see the module docstring."""
    return run_stage(RL, opts, home)
