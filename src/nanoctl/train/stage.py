"""The training-stage framework: what pretrain, mid, sft and rl share, written once.

A stage (pretrain.py, mid.py, sft.py, rl.py) is a `Stage` subclass holding only what is its own: its
options, its plan (`plan`), its model source (`load_model`), its batches (`start`), its step (`step`),
its schedule and its evaluation hook (`evaluate`). `run_stage` does the rest, the same for all four:

    re-launch under torchrun when more than one process is asked for (or print the plan for --dry-run)
    lock the run directory; --force wipes it, a partial run of the same config resumes, a finished one
    is left alone; build the optimizer and restore model, optimizer, RNG, loop and data state
    the loop: checkpoint (periodic, final, on Ctrl+C/SIGTERM -> exit 130) / evaluate / step, with the
    step line and metrics.jsonl; a non-finite loss stops without saving; keep-last-K pruning
    the result object (also what --json prints)
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nanoctl.errors import Interrupted, NanoctlError, UsageError
from nanoctl.options import DISTRIBUTED, OUTPUT, jsonable, option, options_argv, user_config

if TYPE_CHECKING:
    import torch

    from nanoctl.dist import DistInfo
    from nanoctl.home import Home
    from nanoctl.train.schedules import Every


@dataclass
class StageOptions:
    """Options every training stage has."""

    save_every: int | None = option(
        -1, help="Checkpoint every N steps; the final checkpoint is always saved (-1 or 0 = only at the end).",
        unit="steps", panel=OUTPUT,
    )
    keep_last: int = option(0, help="Keep only the newest K checkpoints (0 = keep all).", panel=OUTPUT)
    wandb_run: str | None = option(
        None, help="Log to wandb under this run name (needs wandb installed).", panel=OUTPUT
    )
    device: str = option("auto", help="auto, cpu, cuda, cuda:N or mps.")
    dtype: str | None = option(
        None, help="Compute dtype: bfloat16, float16 or float32 (unset: bf16 on CUDA SM80+, else fp32)."
    )
    seed: int = option(42, help="Random seed.")
    threads: int | None = option(None, help="CPU threads (unset: all cores / processes).")
    compile: str = option("auto", help="torch.compile: auto (CUDA only), on, off.")
    log_format: str = option(
        "auto", help="auto (a live display on a terminal, plain step lines otherwise), rich or plain.", panel=OUTPUT
    )
    resume: bool = option(
        False, help="Require resuming from this stage's latest checkpoint (a partial run resumes anyway)."
    )
    force: bool = option(False, help="Delete this stage's checkpoints of the tag and train again.")
    dry_run: bool = option(
        False, help="Print the plan (sizes, data, batch math, steps, launch command) and exit.", forward=False
    )
    nproc_per_node: int = option(
        1, help="Processes on this node (re-launches under torch.distributed.run).", panel=DISTRIBUTED,
        forward=False,
    )
    nnodes: int = option(1, help="Number of nodes.", panel=DISTRIBUTED, forward=False)
    node_rank: int = option(0, help="This node's rank (0..nnodes-1).", panel=DISTRIBUTED, forward=False)
    rdzv_endpoint: str | None = option(
        None, help="HOST:PORT of node 0 (multi-node).", panel=DISTRIBUTED, forward=False
    )


@dataclass
class Plan:
    """What a stage derives before any weight exists (what --dry-run prints)."""

    tag: str
    num_steps: int  # -1: until the stage says it is finished (mid's one epoch)
    lines: list[str]
    resume_keys: dict[str, Any]  # must match for a resume to continue the same run
    meta: dict[str, Any] = field(default_factory=dict)  # constant keys of every checkpoint's meta
    parent: dict[str, Any] | None = None  # {stage, tag, step} of the checkpoint it starts from
    max_seq_len: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # the stage's own plan object, for --json


@dataclass
class StepStats:
    """One optimizer step as the stage reports it."""

    value: Any  # this rank's loss (rl: mean reward): a float or a 0-d tensor (read after the update)
    tokens: int  # tokens the step processed across ranks (tok/s)
    metrics: dict[str, Any] = field(default_factory=dict)  # extra per-step keys for metrics.jsonl
    extra: str = ""  # the step line's tail


@dataclass
class StageResult:
    """What every stage returns (also printed by `--json`)."""

    stage: str
    model_tag: str
    checkpoint_dir: str
    parent: dict[str, Any] | None
    final_step: int
    num_iterations: int
    final_loss: float | None = None
    val_loss: float | None = None  # sft: val loss; base/mid: val bpb
    metrics: dict[str, Any] = field(default_factory=dict)  # val_bpb, core_metric, accuracy, reward ...
    data: dict[str, Any] = field(default_factory=dict)  # mixture summary, cropped counts
    total_training_time: float = 0.0  # seconds, excluding each process's first 10 steps (nanochat's rule)
    wall_time: float = 0.0
    tokens_per_sec: float | None = None
    resumed_from: int | None = None
    skipped: bool = False  # already complete, or --dry-run
    plan: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def val_bpb(self) -> float | None:
        return self.metrics.get("val_bpb")

    @property
    def min_val_bpb(self) -> float | None:
        return self.metrics.get("min_val_bpb")

    @property
    def core_metric(self) -> float | None:
        return self.metrics.get("core_metric")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def say(msg: str, master: bool = True) -> None:
    """Log lines go to stderr (rank 0 only) so `--json` results on stdout stay clean."""
    if master:
        print(msg, file=sys.stderr, flush=True)


class Stage:
    """One training stage. Subclasses set the class attributes and implement the hooks below."""

    name: ClassVar[str]  # checkpoint directory: base | mid | sft | rl
    command: ClassVar[str]  # the CLI command: pretrain | mid | sft | rl
    value_name: ClassVar[str] = "loss"  # what `StepStats.value` is (rl: reward)
    smooth: ClassVar[bool] = True  # the step line shows the debiased EMA of the value
    compile_dynamic: ClassVar[bool | None] = False  # torch.compile(dynamic=...); None: never compiled
    reports_mfu: ClassVar[bool] = True
    nan_hint: ClassVar[str] = "lower the learning rates (--matrix-lr/--embedding-lr) or check the data"
    # The stage's `--*-every N` options and when each one's work runs (schedules.Every).
    every_flags: ClassVar[dict[str, Every]] = {}

    def __init__(self, opts: Any, home: Home, device: torch.device, world_size: int) -> None:
        self.opts, self.home, self.device, self.world_size = opts, home, device, world_size
        self.o = opts  # the options with the device preset applied (set by `plan`)

    @classmethod
    def prepare_home(cls, home: Home) -> None:
        """Run once per launch before any process starts (post-training unpacks starter task data)."""

    def due(self, flag: str, step: int, last: bool) -> bool:
        """Whether the periodic work of option `flag` (one of `every_flags`) runs at `step`."""
        return self.every_flags[flag].due(getattr(self.o, flag), step, last)

    def check_every(self) -> None:
        """Every `--*-every` value (and --save-every) is N > 0, -1 or 0: anything else is a UsageError."""
        from nanoctl.options import flag_name

        by_name = {f.name: f for f in fields(self.o)}
        for name in ("save_every", *self.every_flags):
            value = getattr(self.o, name)
            if value is not None and value < -1:
                rule = self.every_flags[name].rule if name in self.every_flags else "-1 or 0 = only at the end"
                raise UsageError(f"{flag_name(by_name[name])} {value}: expected N > 0 steps, -1 or 0",
                                 f"N > 0 = every N steps and at the end, {rule}")

    # --- hooks -------------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        raise NotImplementedError

    def make_plan(self) -> Plan:
        """The plan the framework uses: the stage's own, plus what a base class adds (PostStage: LoRA)."""
        return self.plan()

    def run_dir(self, tag: str) -> Path:
        """Where this run's checkpoints go (PostStage with LoRA: the adapter directory)."""
        return self.home.checkpoint_dir(self.name, tag)

    def build_optimizer(self, model: Any) -> Any:
        """The optimizer over what trains (default: every parameter, Muon + AdamW)."""
        return setup_optimizer(model, *self.optimizer_settings())

    def model_state(self, model: Any) -> dict[str, Any] | None:
        """What a checkpoint's model_<step>.pt holds (None: the whole state dict)."""
        return None

    def load_model_state(self, model: Any, state: dict[str, Any]) -> None:
        """Restore what `model_state` saved."""
        model.load_state_dict(state)

    def after_save(self, run: Run) -> None:
        """After each checkpoint (every rank): extra files beside it (PostStage with LoRA: PEFT's)."""

    def report_dir(self, tag: str) -> Path:
        return self.home.report_dir(tag) / self.name

    def load_model(self, run: Run) -> tuple[Any, Any]:
        """(model, tokenizer) on `run.device` in `run.dtype`, before any checkpoint of this stage loads."""
        raise NotImplementedError

    def optimizer_settings(self) -> tuple[dict[str, float], float, float]:
        """(LRs by group: embedding/unembedding/matrix/scalar, Muon weight decay, LR fraction)."""
        o = self.opts
        lrs = dict(embedding=o.embedding_lr, unembedding=o.unembedding_lr, matrix=o.matrix_lr, scalar=o.scalar_lr)
        return lrs, o.weight_decay, getattr(o, "init_lr_frac", 1.0)

    def start(self, run: Run, saved: dict[str, Any], loader_state: dict[str, Any] | None) -> None:
        """Build batches and eval data; `saved` is the resumed checkpoint's meta ({} when fresh)."""

    def loader_state(self) -> dict[str, Any]:
        """This rank's data position, saved with every checkpoint."""
        return {}

    def step(self, run: Run, step: int) -> StepStats:
        """Forward and backward (through `run.backward`) over one optimizer step's micro-batches."""
        raise NotImplementedError

    def schedule(self, step: int, num_steps: int) -> tuple[float, float | None, float | None]:
        """(LR multiplier, Muon momentum or None, Muon weight decay or None) for this step."""
        return 1.0 - step / num_steps, None, None

    def evaluate(self, run: Run, step: int, last: bool) -> dict[str, Any]:
        """The stage's evals due at `step`: print them with run.print and return them for metrics.jsonl."""
        return {}

    def finished(self, run: Run, step: int, num_steps: int) -> bool:
        return step >= num_steps

    def estimated_steps(self, step: int) -> int:
        """The horizon to show when the plan has none (num_steps -1, e.g. mid's one epoch)."""
        return max(step, 1)

    def close(self) -> None:
        """Release data loaders (background threads) when the loop ends, however it ends."""

    def state(self) -> dict[str, Any]:
        """The stage's own meta keys (eval results, data summary), saved with every checkpoint."""
        return {}

    def loop_state(self) -> dict[str, Any]:
        """Extra keys of the meta's loop_state that resume restores (val bpb history ...)."""
        return {}

    def on_step(self, step: int, value: float) -> None:
        """After each optimizer step, with the value agreed across ranks."""

    def step_line(self, run: Run, step: int, num_steps: int, stats: StepStats, shown: float, lrm: float,
                  dt: float, mfu: float | None) -> str:
        from nanoctl.train.progress import StepLine

        return str(
            StepLine(step, num_steps, shown, lrm, dt, stats.tokens / dt, mfu, run.loop.total_training_time,
                     run.eta(num_steps - step), extra=stats.extra)
        )

    def done_line(self, run: Run) -> str:
        return f"done: {run.step} steps; checkpoint {run.directory}"

    def result(self, run: Run) -> dict[str, Any]:
        """Stage-specific StageResult fields (val_loss, metrics, data)."""
        return {}


def run_stage(stage_cls: type[Stage], opts: Any, home: Any = None) -> StageResult:
    """Run a stage: re-launch under torchrun when asked (the launcher then reports what the workers wrote),
    print the plan for --dry-run, else train in this process. The home is resolved here, once."""
    from nanoctl import dist
    from nanoctl.home import Home

    home = Home.resolve(home)
    wall0 = time.perf_counter()
    if not opts.dry_run and dist.env_world()[0] == 0:
        stage_cls.prepare_home(home)
    if opts.dry_run or dist.wants_relaunch(opts.nproc_per_node, opts.nnodes):
        from nanoctl.device import resolve_device

        stage = stage_cls(opts, home, resolve_device(opts.device), opts.nproc_per_node * opts.nnodes)
        plan = stage.make_plan()
        stage.check_every()
        if opts.nproc_per_node > 1 or opts.nnodes > 1:
            plan.details["torchrun_command"] = _launch_command(stage_cls, opts)
            plan.lines.append("launch: " + plan.details["torchrun_command"])
        for line in plan.lines:
            say(line)
        if opts.dry_run:
            return _planned_result(stage, plan)
        dist.relaunch_with_torchrun(
            opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint,
            options_argv(opts, stage_cls.command), home=home,
        )
        return _result_from_checkpoint(stage, plan, wall0)
    info = dist.init_distributed(opts.device)
    try:
        result = _train(stage_cls, opts, home, info, wall0)
        # Every rank reaches the end before any tears down the group: rank 0 hosts the store, and a
        # rank still talking to it when rank 0 exits dies in gloo ("terminate called ...").
        dist.barrier()
        return result
    finally:
        dist.cleanup()


def _launch_command(stage_cls: type[Stage], opts: Any) -> str:
    from nanoctl import dist

    argv = options_argv(opts, stage_cls.command)
    return dist.format_command(
        dist.torchrun_command(opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, argv)
    )


def _planned_result(stage: Stage, plan: Plan) -> StageResult:
    directory = stage.run_dir(plan.tag)
    return StageResult(stage.name, plan.tag, str(directory), plan.parent, 0, plan.num_steps, skipped=True,
                       plan=plan.lines, details=jsonable(plan.details))


def _result_from_checkpoint(stage: Stage, plan: Plan, wall0: float) -> StageResult:
    """After a torchrun re-launch: read what the workers wrote."""
    import json

    from nanoctl.checkpoint import meta_path
    from nanoctl.train.resume import find_resume_step

    directory = stage.run_dir(plan.tag)
    step = find_resume_step(directory)
    meta = json.loads(meta_path(directory, step).read_text()) if step is not None else {}
    return _result_from_meta(stage.name, plan, directory, meta, wall0, skipped=False)


def _result_from_meta(name: str, plan: Plan, directory: Path, meta: dict[str, Any], wall0: float,
                      skipped: bool) -> StageResult:
    loop = meta.get("loop_state") or {}
    metrics = dict(meta.get("metrics") or {})
    for key in ("val_bpb", "core_metric"):
        if meta.get(key) is not None:
            metrics.setdefault(key, meta[key])
    if loop.get("min_val_bpb") is not None:
        metrics.setdefault("min_val_bpb", loop["min_val_bpb"])
    return StageResult(
        stage=name, model_tag=plan.tag, checkpoint_dir=str(directory), parent=meta.get("parent", plan.parent),
        final_step=meta.get("step", 0), num_iterations=meta.get("num_iterations", plan.num_steps),
        final_loss=meta.get("train_loss"), val_loss=meta.get("val_loss", meta.get("val_bpb")), metrics=metrics,
        data=meta.get("data") or {}, total_training_time=loop.get("total_training_time", 0.0),
        wall_time=time.perf_counter() - wall0, skipped=skipped, plan=plan.lines, details=jsonable(plan.details),
    )


# --- one run in this process -------------------------------------------------------------------------------


@dataclass
class Output:
    """The stage's checkpoint directory and what is already in it."""

    directory: Path
    resume_step: int | None
    saved_meta: dict[str, Any]
    done: bool  # a final checkpoint of the same config exists: nothing to do


def prepare_output(stage: Stage, plan: Plan, master: bool) -> Output:
    """--force wipes; a partial run of the same config resumes; a finished one is left alone."""
    from nanoctl import dist
    from nanoctl.checkpoint import load_meta
    from nanoctl.train.resume import config_diff, find_resume_step

    opts = stage.opts
    directory = stage.run_dir(plan.tag)
    resume_step = find_resume_step(directory)
    if opts.force and resume_step is not None:
        if master:
            say(f"--force: removing the existing checkpoints in {directory}")
            for f in directory.iterdir():
                if f.name.startswith(("model_", "meta_", "optim_")):
                    f.unlink()
        dist.barrier()
        resume_step = None
    if resume_step is None and opts.resume:
        raise NanoctlError(f"--resume: no complete checkpoint in {directory}", "drop --resume to start a new run")
    if resume_step is None:
        return Output(directory, None, {}, False)
    meta = load_meta(directory, resume_step)
    keys = jsonable(plan.resume_keys)
    diffs = config_diff(meta.get("resume_keys", {}), keys, keys)
    if diffs:
        tag_flag = "--model-tag" if stage.name == "base" else "--output-tag"
        raise UsageError(
            f"{stage.name} checkpoint {plan.tag}@{resume_step} was trained with a different config: "
            + "; ".join(diffs),
            f"rerun with the original options, pick another {tag_flag}, or start over with --force",
        )
    return Output(directory, resume_step, meta, bool(meta.get("final")))


@contextmanager
def _run_lock(directory: Path, master: bool) -> Iterator[None]:
    """Global rank 0 holds the run directory's advisory lock for the whole run."""
    if not master:
        yield
        return
    from nanoctl.checkpoint import lock_run_dir

    with lock_run_dir(directory, "training run"):
        yield


class Run:
    """Everything one stage run in this process holds: the model, optimizer, loop record and outputs."""

    def __init__(self, stage: Stage, plan: Plan, info: DistInfo, dtype: Any, out: Output) -> None:
        from nanoctl.train.resume import LoopState

        self.stage, self.plan, self.info, self.dtype, self.out = stage, plan, info, dtype, out
        self.device, self.master, self.home = info.device, info.is_master, stage.home
        self.directory = out.directory
        self.start = self.step = out.resume_step or 0
        self.resumed = out.resume_step is not None
        self.loop = LoopState()
        self.model: Any = None  # the uncompiled module: evals, sampling and saving use it
        self.train_model: Any = None  # what the training step calls (compiled when asked)
        self.tokenizer: Any = None
        self.optimizer: Any = None
        self.scaler: Any = None
        self.reporter: Any = None
        self.metrics: Any = None
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.last_value: float | None = None
        self.ema: Any = None
        self.peak: float | None = None
        self.flops_per_token = 0.0
        # a test aid, read once here: kill tests pause after each step to land between checkpoints
        self.step_sleep = float(os.environ.get("NANOCTL_STEP_SLEEP", "0") or 0)
        self.last_saved: int | None = out.resume_step

    def print(self, msg: str) -> None:
        if self.reporter is not None:
            self.reporter.print(msg)
        else:
            say(msg, self.master)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale_loss(loss).backward()

    def eta(self, remaining_steps: int) -> float:
        recent = self.step_times[-20:]
        return remaining_steps * (sum(recent) / len(recent)) if recent else float("nan")

    def num_steps(self) -> int:
        """The horizon for display: the plan's, or the stage's estimate (mid's epoch)."""
        if self.plan.num_steps > 0:
            return self.plan.num_steps
        return self.stage.estimated_steps(self.step)

    def save(self, final: bool) -> None:
        import torch

        from nanoctl.train.resume import gather_loader_state, save_training_checkpoint
        from nanoctl.train.runtime import rng_state_b64

        # The loss check sees the loss *before* each update: an update can still blow the weights up (a huge
        # LR). Never write those: the previous checkpoint stays the last good one. One sync, only when saving.
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            kept = f"the last good checkpoint (step {self.last_saved}) is kept" if self.last_saved is not None \
                else "no checkpoint was written"
            raise NanoctlError(f"training weights became non-finite at step {self.step}; stopped: {kept}",
                               self.stage.nan_hint)
        num = self.step if final and self.plan.num_steps <= 0 else self.plan.num_steps
        meta = {
            "step": self.step, "stage": self.stage.name, "model_config": self.model.config.to_dict(),
            "user_config": user_config(self.stage.opts), "resume_keys": jsonable(self.plan.resume_keys),
            "parent": self.plan.parent, **self.plan.meta, "num_iterations": num,
            "loader_state": gather_loader_state(self.stage.loader_state()),
            "loop_state": self.loop.to_dict() | self.stage.loop_state(), "rng_state": rng_state_b64(),
            "train_loss": self.last_value if self.stage.value_name == "loss" else None, "final": final,
            **self.stage.state(),
        }
        save_training_checkpoint(self.directory, self.step, self.model, self.optimizer, jsonable(meta),
                                 self.info, self.stage.o.keep_last, self.stage.model_state(self.model))
        self.stage.after_save(self)
        self.last_saved = self.step
        self.print(f"saved checkpoint {self.directory}/model_{self.step:06d}.pt")


def _train(stage_cls: type[Stage], opts: Any, home: Home, info: DistInfo, wall0: float) -> StageResult:
    from nanoctl.device import compute_dtype_with_reason, device_name
    from nanoctl.train.runtime import seed_everything, set_cpu_threads

    seed_everything(opts.seed)
    threads = set_cpu_threads(opts.threads) if info.device.type == "cpu" else None
    dtype, reason = compute_dtype_with_reason(info.device, opts.dtype)
    stage = stage_cls(opts, home, info.device, info.world_size)
    plan = stage.make_plan()
    stage.check_every()
    say(f"nanoctl {stage.command}: {plan.tag} on {device_name(info.device)} ({info.device.type},"
        f" {info.world_size} process(es))", info.is_master)
    say(f"compute dtype: {str(dtype).removeprefix('torch.')} ({reason})"
        + (f"; {threads} CPU threads" if threads else ""), info.is_master)
    for line in plan.lines:
        say(line, info.is_master)
    directory = stage.run_dir(plan.tag)
    with _run_lock(directory, info.is_master):
        out = prepare_output(stage, plan, info.is_master)
        if out.done:
            say(f"already trained: {directory} step {out.resume_step} (use --force to retrain)", info.is_master)
            return _result_from_meta(stage.name, plan, directory, out.saved_meta, wall0, skipped=True)
        run = Run(stage, plan, info, dtype, out)
        _build(run)
        _loop(run)
        return _finish(run, wall0)


def _build(run: Run) -> None:
    """Model, optimizer, restored state, batches, the compiled step model, metrics and the reporter."""
    import torch

    from nanoctl.checkpoint import save_tokenizer_copy
    from nanoctl.device import peak_flops
    from nanoctl.metrics import MetricsLogger
    from nanoctl.train.progress import LossEMA, Reporter
    from nanoctl.train.runtime import LossScaler, want_compile

    stage, out, info = run.stage, run.out, run.info
    run.model, run.tokenizer = stage.load_model(run)
    run.optimizer = stage.build_optimizer(run.model)
    loader_state = _restore(run) if out.resume_step is not None else None
    run.scaler = LossScaler(run.dtype == torch.float16, run.loop.loss_scaler)  # fp16 only, as nanochat
    stage.start(run, out.saved_meta, loader_state)
    run.train_model = run.model
    seq_len = run.plan.max_seq_len or int(run.model.config.sequence_len)
    flex = False
    if stage.compile_dynamic is not None and want_compile(stage.opts.compile, run.device):
        if not stage.compile_dynamic:
            flex = run.model.prepare_flex_attention(seq_len)
        say(f"compiling the model (torch.compile, dynamic={stage.compile_dynamic})", run.master)
        run.train_model = torch.compile(run.model, dynamic=stage.compile_dynamic)
    say(f"attention: {run.model.attention_summary(seq_len, flex)}", run.master)
    config = {"options": user_config(stage.opts), "plan": jsonable(run.plan.details) or run.plan.lines}
    run.metrics = MetricsLogger(
        stage.report_dir(run.plan.tag), wandb_project="nanoctl" if stage.name == "base" else f"nanoctl-{stage.name}",
        wandb_run=stage.opts.wandb_run, rank=info.rank, config=config,
        truncate_after_step=run.start if out.resume_step is not None else -1,
    )
    if run.master:
        save_tokenizer_copy(run.directory, run.home, run.tokenizer)  # the parent's, not the home's
    run.reporter = Reporter(run.num_steps(), start=run.start, enabled=run.master, log_format=stage.opts.log_format)
    run.ema = LossEMA.from_state(run.loop.ema)
    run.peak = peak_flops(run.device) if stage.reports_mfu else None
    run.flops_per_token = run.model.estimate_flops()


def setup_optimizer(model: Any, lrs: dict[str, float], weight_decay: float, lr_frac: float = 1.0) -> Any:
    """The model's Muon + AdamW with every group's LR (and its schedule base) scaled by `lr_frac`."""
    optimizer = model.setup_optimizer(
        unembedding_lr=lrs["unembedding"], embedding_lr=lrs["embedding"], matrix_lr=lrs["matrix"],
        scalar_lr=lrs["scalar"], weight_decay=weight_decay,
    )
    if lr_frac != 1.0:
        for group in optimizer.param_groups:
            group["lr"] *= lr_frac
            group["initial_lr"] = group["lr"]
    return optimizer


def _restore(run: Run) -> dict[str, Any] | None:
    """Weights, optimizer shard, loop record and RNG of the run's latest checkpoint; this rank's data state."""
    from nanoctl.checkpoint import load_checkpoint
    from nanoctl.train.resume import LoopState, rank_loader_state
    from nanoctl.train.runtime import restore_rng_state

    info = run.info
    model_sd, optim_sd, meta = load_checkpoint(
        run.directory, run.out.resume_step, device=run.device, load_optimizer=True, rank=info.rank
    )
    run.stage.load_model_state(run.model, model_sd)
    run.optimizer.load_state_dict(optim_sd)
    del model_sd, optim_sd
    run.loop = LoopState.from_dict(meta.get("loop_state"))
    restore_rng_state(meta.get("rng_state"))
    say(f"resuming from step {run.out.resume_step} ({run.directory})", run.master)
    return rank_loader_state(meta.get("loader_state"), info.rank, info.world_size)


def _loop(run: Run) -> None:
    """Checkpoint, evaluate, stop if asked, step; until the stage's horizon."""
    from nanoctl.train.interrupts import StopSignal
    from nanoctl.train.runtime import GCFreeze

    stage, opts = run.stage, run.stage.o
    gcf = GCFreeze()
    try:
        with StopSignal() as stop:
            while True:
                last = stage.finished(run, run.step, run.num_steps())
                if last:  # saved before the final evals, so a failing eval never costs the training run
                    run.save(final=True)
                elif opts.save_every > 0 and run.step % opts.save_every == 0 and run.step != run.start:
                    run.save(final=False)
                if not (run.step == run.start and run.resumed):
                    evals = stage.evaluate(run, run.step, last)
                    if evals:
                        run.metrics.log(run.step, **evals)
                if last:
                    break
                if stop.should_stop(run.device):
                    if run.step != run.start or not run.resumed:
                        run.save(final=False)
                    raise Interrupted(
                        f"stopped at step {run.step}/{run.num_steps()}; checkpoint saved in {run.directory}",
                        "rerun the same command to resume",
                    )
                _step(run)
                gcf.after_step(run.step)
                if run.step_sleep:
                    time.sleep(run.step_sleep)
    finally:
        gcf.close()
        run.reporter.close()
        run.metrics.close()
        stage.close()


def _step(run: Run) -> None:
    """One optimizer step: the stage's forward/backward, the schedule, the update, the step line."""
    import torch

    from nanoctl.device import synchronize
    from nanoctl.dist import all_reduce_mean
    from nanoctl.train.schedules import apply_schedules

    stage, step, device = run.stage, run.step, run.device
    synchronize(device)
    t0 = time.perf_counter()
    try:
        stats = stage.step(run, step)
        lrm, momentum, weight_decay = stage.schedule(step, run.num_steps())
        apply_schedules(run.optimizer, lrm, momentum, weight_decay)
        if run.scaler.unscale_and_check(run.optimizer):
            run.optimizer.step()
        else:
            run.print(f"step {step:05d} | fp16 gradients overflowed: step skipped, loss scale now {run.scaler.scale:g}")
        after_step = getattr(run.model, "after_optimizer_step", None)
        if after_step is not None:  # per-step model state outside the optimizer (MoE routing biases)
            after_step()
        run.model.zero_grad(set_to_none=True)
        run.loop.loss_scaler = run.scaler.state_dict()
    except torch.OutOfMemoryError as e:
        raise NanoctlError(
            f"{device.type.upper()} out of memory at --device-batch-size {getattr(stage.opts, 'device_batch_size', '?')}",
            "lower --device-batch-size (grad accumulation keeps the same total batch)",
        ) from e
    value = stats.value.item() if hasattr(stats.value, "item") else stats.value
    value = all_reduce_mean(float(value), device)
    synchronize(device)
    dt = time.perf_counter() - t0
    if not math.isfinite(value):
        kept = f"the last good checkpoint (step {run.last_saved}) is kept" if run.last_saved is not None \
            else "no checkpoint was written"
        raise NanoctlError(f"training {stage.value_name} became {value} at step {step + 1}; stopped: {kept}",
                           stage.nan_hint)
    run.step = step = step + 1
    run.last_value = value
    stage.on_step(step, value)
    shown = run.ema.update(value) if stage.smooth else value
    run.loop.ema = run.ema.state_dict()
    run.loop.step = step
    if step - run.start > 10:
        run.loop.total_training_time += dt
    run.step_times.append(dt)
    run.step_tokens.append(stats.tokens)
    n = run.num_steps()
    mfu = (100 * run.flops_per_token * stats.tokens / dt / (run.peak * run.info.world_size)
           if run.peak else None)
    run.reporter.step(stage.step_line(run, step, n, stats, shown, lrm, dt, mfu), advance_to=step, loss=shown,
                      tok_per_sec=stats.tokens / dt, mfu=mfu, elapsed=run.loop.total_training_time,
                      eta=run.eta(n - step))
    record = {stage.value_name: value, "lrm": lrm, "dt": dt, **stats.metrics}
    if stage.smooth:
        record.update(loss_ema=shown, tok_per_sec=stats.tokens / dt, mfu=mfu)
    run.metrics.log(step, **record)


def _finish(run: Run, wall0: float) -> StageResult:
    """The final meta gains the final evals (the checkpoint was written before them); the result."""
    from nanoctl.device import max_memory_allocated_mib

    stage = run.stage
    if run.master:
        update_meta(run.directory, run.step, loop_state=run.loop.to_dict() | stage.loop_state(), **stage.state())
    peak_mem = max_memory_allocated_mib(run.device)
    say(stage.done_line(run) + (f"; peak memory {peak_mem:.0f} MiB" if peak_mem else ""), run.master)
    times, tokens = run.step_times[10:] or run.step_times, run.step_tokens[10:] or run.step_tokens
    fields = dict(
        stage=stage.name, model_tag=run.plan.tag, checkpoint_dir=str(run.directory), parent=run.plan.parent,
        final_step=run.step, num_iterations=run.plan.num_steps if run.plan.num_steps > 0 else run.step,
        final_loss=run.last_value if stage.value_name == "loss" else None,
        total_training_time=run.loop.total_training_time, wall_time=time.perf_counter() - wall0,
        tokens_per_sec=sum(tokens) / sum(times) if times else None, resumed_from=run.out.resume_step,
        plan=run.plan.lines, details=jsonable(run.plan.details),
    )
    return StageResult(**(fields | stage.result(run)))


def update_meta(directory: Path, step: int, **updates: Any) -> None:
    """Rewrite a step's meta JSON (atomically) with extra keys, e.g. evals run after the save."""
    import json

    from nanoctl.atomic import atomic_write_json
    from nanoctl.checkpoint import meta_path

    path = meta_path(directory, step)
    meta = json.loads(path.read_text())
    meta.update(jsonable(updates))
    atomic_write_json(path, meta)
