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

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.options import OPTIMIZATION, OUTPUT, RUNTIME, apply_preset, option
from nanoctl.train.parent import MixtureOptions, PostStage, lineage
from nanoctl.train.schedules import EVERY, EVERY_AFTER_START
from nanoctl.train.stage import Plan, Run, StageResult, StepStats, run_stage


@dataclass
class SFTOptions(MixtureOptions):
    """Options of `nanoctl sft`. None = the device preset (GPU_PRESET on CUDA, else CPU_PRESET)."""

    num_epochs: int = option(1, help="Epochs over the mixture when --num-iterations is -1.", panel=OPTIMIZATION)
    num_iterations: int | None = option(None, help="Optimizer steps; -1 = --num-epochs over the mixture.", panel=OPTIMIZATION)
    device_batch_size: int | None = option(None, help="Conversations per forward pass per process.", panel=OPTIMIZATION)
    target_examples_per_step: int | None = option(None, help="Conversations per optimizer step.", panel=OPTIMIZATION)
    max_seq_len: int | None = option(None, help="Tokens per row (unset: the model's context).", unit="tokens", panel=OPTIMIZATION)
    init_lr_frac: float | None = option(None, help="Starting LR as a fraction of the LRs above.", panel=OPTIMIZATION)
    eval_every: int | None = option(
        None, help=f"Val loss every N steps and at the end ({EVERY.rule}).", unit="steps", panel=OUTPUT
    )
    eval_steps: int | None = option(None, help="Val batches per eval.", panel=OUTPUT)
    eval_metrics_every: int | None = option(
        None, help=f"Multiple-choice accuracy every N steps and at the end ({EVERY_AFTER_START.rule}).", unit="steps",
        panel=OUTPUT,
    )
    eval_metrics_max_problems: int | None = option(None, help="Problems per accuracy task.", panel=OUTPUT)
    metric_tasks: list[str] = option(
        help="Multiple-choice tasks for the quick accuracy (repeatable; MMLU, ARC-Easy, ARC-Challenge).",
        panel=OUTPUT, factory=lambda: ["MMLU", "ARC-Easy"], flag="--metric-task",
    )
    # variable-length batches: compiling would recompile per shape
    compile: str = option("off", help="torch.compile: auto (CUDA only), on, off.", panel=RUNTIME)
    # library only: train/validate on these Task objects instead of the mixture


GPU_PRESET = SFTOptions(
    device_batch_size=4, target_examples_per_step=32, num_iterations=-1, eval_every=100, eval_steps=100,
    eval_metrics_every=200, eval_metrics_max_problems=1024, init_lr_frac=0.02,  # nanochat
)
CPU_PRESET = SFTOptions(
    device_batch_size=4, target_examples_per_step=8, num_iterations=30, eval_every=15, eval_steps=4,
    eval_metrics_every=30, eval_metrics_max_problems=16,
    # A tiny model given 30 steps barely moves at 2% of the LR: at 1.0 the d4 CPU model's val loss is
    # 0.90 instead of 5.2 and it answers "Who are you?" from the identity data (bench/RESULTS.md).
    init_lr_frac=1.0,
)
PRESETS = {"CUDA": GPU_PRESET, "CPU": CPU_PRESET}


@dataclass
class RenderStats:
    """How many conversations were rendered, cropped to the context, or dropped (nothing to learn)."""

    rendered: int = 0
    cropped: int = 0
    dropped: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def render_cropped(tokenizer: Any, conversation: dict[str, Any], max_len: int, stats: RenderStats) -> tuple[list[int], list[int]]:
    """Render, then crop to `max_len` tokens (= context + 1, so inputs fit the context), counting crops.

    Rendering with nanochat's default max_tokens=2048 at a shorter context is the NaN-loss bug (PR #834);
    here the crop always matches the row length.
    """
    from nanoctl.tokenizer import RENDER_ALL

    ids, mask = tokenizer.render_conversation(conversation, max_tokens=RENDER_ALL)
    stats.rendered += 1
    if len(ids) > max_len:
        stats.cropped += 1
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


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


def load_metric_tasks(names: Any, data_dir: Any, home: Any) -> tuple[dict[str, Any], list[str]]:
    """The quick-accuracy tasks that are available; the rest are reported as skipped."""
    from nanoctl.tasks import get_task

    tasks: dict[str, Any] = {}
    skipped: list[str] = []
    for name in names:
        try:
            task = get_task(name, data_dir=data_dir, home=home)
        except NanoctlError as e:
            skipped.append(f"{name} ({e.message.split(' (')[0]})")
            continue
        if task.eval_type != "categorical":
            raise UsageError(f"--metric-task {name} is not a multiple-choice task", "use MMLU, ARC-Easy or ARC-Challenge")
        tasks[name] = task
    return tasks, skipped


class SFT(PostStage):
    name = command = "sft"
    compile_dynamic = True
    reports_mfu = False
    nan_hint = "lower --init-lr-frac or check the data"
    every_flags = {"eval_every": EVERY, "eval_metrics_every": EVERY_AFTER_START}

    def plan(self) -> Plan:
        o = self.o = apply_preset(self.opts, GPU_PRESET if self.device.type == "cuda" else CPU_PRESET)
        world = self.world_size
        ref, parent_meta, tag = self.find_parent()
        T = self.T = self.context_len(parent_meta)
        B, target = o.device_batch_size, o.target_examples_per_step
        for name, val in (("--device-batch-size", B), ("--target-examples-per-step", target), ("--num-epochs", o.num_epochs)):
            if val < 1:
                raise UsageError(f"{name} must be >= 1, got {val}")
        if target % (B * world):
            raise UsageError(
                f"--target-examples-per-step {target} is not a multiple of --device-batch-size x processes = {B} x {world}",
                f"use --target-examples-per-step {max(1, round(target / (B * world))) * B * world}",
            )
        self.grad_accum = target // (B * world)
        self.mixture = self.mixture_of_options()
        n_train = len(self.mixture.train)
        iters = o.num_iterations
        if iters is None or iters <= 0:
            iters = (n_train // target) * o.num_epochs
            horizon = f"{o.num_epochs} epoch(s) of {n_train:,} conversations"
        else:
            horizon = "--num-iterations" + (" (CPU preset)" if self.opts.num_iterations is None else "")
        if iters < 1:
            raise UsageError(f"{n_train} training conversations make 0 steps of {target} examples",
                             "lower --target-examples-per-step or add data")
        lines = [
            f"sft: {ref.stage}/{ref.tag}@{ref.step} -> checkpoints/sft/{tag}",
            f"preset: {'gpu' if self.device.type == 'cuda' else 'cpu'} defaults; context {T} tokens",
            f"batch: {target} conversations/step = {B} rows x {world} process(es) x {self.grad_accum} grad accum step(s)"
            " (rows padded per micro-batch)",
            f"horizon ({horizon}): {iters:,} steps; LR x{o.init_lr_frac} decaying linearly to 0",
            f"LRs: embedding {o.embedding_lr}, unembedding {o.unembedding_lr}, matrix {o.matrix_lr},"
            f" scalar {o.scalar_lr} (AdamW ones scaled by (width/768)^-0.5)",
            f"eval: val loss {EVERY.describe(o.eval_every)} ({o.eval_steps} batches); accuracy of"
            f" {', '.join(o.metric_tasks) or 'no task'} {EVERY_AFTER_START.describe(o.eval_metrics_every)}"
            f" (max {o.eval_metrics_max_problems} problems)",
            "data:", *self.mixture.summary_lines(), *self.persona_lines(self.mixture),
        ]
        resume_keys = {
            "parent": lineage(ref), "--max-seq-len": T, "--device-batch-size": B, "--target-examples-per-step": target,
            "world size": world, "num_iterations": iters, "train conversations": n_train,
            "lrs": [o.embedding_lr, o.unembedding_lr, o.matrix_lr, o.scalar_lr, o.init_lr_frac],
            **self.persona_keys(),
        }
        meta = {"device_batch_size": B, "max_seq_len": T}
        return Plan(tag, iters, lines, resume_keys, meta, lineage(ref), T, details={"data": self.mixture.to_dict()})

    def optimizer_settings(self) -> tuple[dict[str, float], float, float]:
        lrs, wd, _ = super().optimizer_settings()
        return lrs, wd, self.o.init_lr_frac

    def start(self, run: Run, saved: dict[str, Any], loader_state: dict[str, Any] | None) -> None:
        o, info = self.o, run.info
        self.stats = RenderStats(**((saved.get("data") or {}).get("render") or {}))
        self.val_loss: float | None = saved.get("val_loss")
        self.accuracies: dict[str, float] = dict(saved.get("metrics") or {})
        cursor = (loader_state or {}).get("cursor", 0)
        self.batches = SFTBatches(run.tokenizer, self.mixture.train, o.device_batch_size, self.T, info.rank,
                                  info.world_size, cursor, self.stats)
        self.metric_tasks, skipped = load_metric_tasks(o.metric_tasks, o.data_dir, self.home)
        for s in skipped:
            run.print(f"note: quick accuracy skips {s}")

    def loader_state(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def step(self, run: Run, step: int) -> StepStats:
        import torch

        loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
        tokens = 0
        for _ in range(self.grad_accum):
            x, y = next(self.batches)
            x, y = x.to(run.device), y.to(run.device)
            n_valid = (y >= 0).sum()
            # sum / count (not reduction="mean"): a micro-batch without targets gives 0, never NaN
            loss = run.train_model(x, y, loss_reduction="sum") / n_valid.clamp(min=1)
            loss_sum += loss.detach().double()
            tokens += int(n_valid.item())
            run.backward(loss / self.grad_accum)
        epoch = self.batches.epoch
        return StepStats(loss_sum / self.grad_accum, tokens * run.info.world_size,
                         {"supervised_tokens": tokens, "epoch": epoch}, f"epoch {epoch:.2f}")

    def evaluate(self, run: Run, step: int, last: bool) -> dict[str, Any]:
        o, out = self.o, {}
        if self.due("eval_every", step, last):
            self.val_loss = out["val_loss"] = self._val_loss(run)
            run.print(f"step {step:05d} | validation loss: {self.val_loss:.6f}")
        if self.metric_tasks and self.due("eval_metrics_every", step, last):
            from nanoctl.evaluate.chat import categorical_accuracy

            for name, task in self.metric_tasks.items():
                acc = self.accuracies[name] = categorical_accuracy(
                    run.model, run.tokenizer, task, max_problems=o.eval_metrics_max_problems,
                    batch_size=o.device_batch_size, device=run.device, rank=run.info.rank,
                    world_size=run.info.world_size,
                )
                run.print(f"step {step:05d} | {name} accuracy: {acc:.4f}")
                out[f"acc/{name}"] = acc
        return out

    def _val_loss(self, run: Run) -> float:
        """Token-weighted mean loss over `eval_steps` val batches (all ranks)."""
        import torch

        info = run.info
        vb = SFTBatches(run.tokenizer, self.mixture.val, self.o.device_batch_size, self.T, info.rank, info.world_size)
        sums = torch.zeros(2, dtype=torch.float64, device=run.device)
        run.model.eval()
        with torch.no_grad():
            for _ in range(self.o.eval_steps):
                x, y = next(vb)
                x, y = x.to(run.device), y.to(run.device)
                sums[0] += run.model(x, y, loss_reduction="sum").double()
                sums[1] += (y >= 0).sum()
        run.model.train()
        if info.distributed:
            torch.distributed.all_reduce(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    def state(self) -> dict[str, Any]:
        return {"val_loss": self.val_loss, "metrics": self.accuracies,
                "data": {**self.mixture.to_dict(), "render": self.stats.to_dict()}}

    def done_line(self, run: Run) -> str:
        note = ""
        if self.stats.cropped or self.stats.dropped:
            note = (f"note: {self.stats.cropped} conversation(s) cropped to the {self.T}-token context,"
                    f" {self.stats.dropped} dropped (no assistant token left)\n")
        val = self.val_loss if self.val_loss is None else round(self.val_loss, 4)
        return note + f"done: {run.step} steps; final val loss {val}; checkpoint {run.directory}"


def sft(opts: SFTOptions, home: Any = None) -> StageResult:
    """Fine-tune on conversations; see the module docstring."""
    return run_stage(SFT, opts, home)
