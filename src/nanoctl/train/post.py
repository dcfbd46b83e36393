"""What mid, sft and rl share: parent checkpoint lookup, output/resume handling, rendering, launch.

The stage chain is base -> mid -> sft -> rl. Each stage starts from its parent's latest checkpoint
(sft falls back to base when there is no mid), writes `<home>/checkpoints/<stage>/<tag>/` with the parent
in the meta (`parent`: {stage, tag, step}), logs `<home>/reports/<tag>/<stage>/metrics.jsonl`, and
resumes a partial run of the same tag (as `nanoctl pretrain` does).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError

# Where each stage starts from, in order of preference.
PARENTS: dict[str, tuple[str, ...]] = {"mid": ("base",), "sft": ("mid", "base"), "rl": ("sft",)}
SOURCE_COMMANDS = {"base": "nanoctl pretrain", "mid": "nanoctl mid", "sft": "nanoctl sft", "rl": "nanoctl rl"}
MISSING_PARENT_HINT = {
    "mid": "`nanoctl pretrain`",
    "sft": "`nanoctl pretrain` (and `nanoctl mid`)",
    "rl": "`nanoctl sft`",
}


@dataclass
class PostOptions:
    """Options every post-training stage has (see each stage's Options for the rest)."""

    # where to start from
    source: str | None = None  # parent stage (default: the stage's natural parent)
    model_tag: str | None = None  # parent tag (default: the largest d<N>)
    model_step: int | None = None  # parent step (default: its latest)
    checkpoint: str | None = None  # or an explicit checkpoint directory
    # output
    output_tag: str | None = None  # default: the parent's tag
    save_every: int = -1
    keep_last: int = 0
    wandb_run: str | None = None
    # runtime
    device: str = "auto"
    dtype: str | None = None
    seed: int = 42
    threads: int | None = None
    compile: str = "off"  # variable-length batches: compile would recompile per shape
    resume: bool = False
    force: bool = False
    dry_run: bool = False
    home: str | os.PathLike[str] | None = None
    # distributed
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None


@dataclass
class StageResult:
    """What a post-training stage returns (also printed by `--json`)."""

    stage: str
    model_tag: str
    checkpoint_dir: str
    parent: dict[str, Any] | None
    final_step: int
    num_iterations: int
    final_loss: float | None = None
    val_loss: float | None = None  # sft: val loss; mid: val bpb
    metrics: dict[str, Any] = field(default_factory=dict)  # stage-specific (accuracy, reward, pass@k ...)
    data: dict[str, Any] = field(default_factory=dict)  # mixture summary, cropped counts
    total_training_time: float = 0.0
    wall_time: float = 0.0
    resumed_from: int | None = None
    skipped: bool = False
    plan: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def say(msg: str, master: bool = True) -> None:
    if master:
        print(msg, file=sys.stderr, flush=True)


def run_stage(stage: str, opts: PostOptions, run: Any) -> StageResult:
    """Common entry of mid/sft/rl: export the home, re-launch under torchrun when asked (the launcher then
    reports the workers' checkpoint), else set up the process group and call `run(opts, info, wall0)`."""
    from nanoctl import dist

    if opts.home is not None:
        os.environ["NANOCTL_HOME"] = str(Path(opts.home).expanduser().resolve())
    wall0 = time.perf_counter()
    if opts.data_dir is None and not opts.dry_run and dist.env_world()[0] == 0:
        # The packaged identity conversations and word list make mid/sft work offline on a fresh home.
        from nanoctl.pipeline import install_starter_task_data

        install_starter_task_data(opts.home)
    if maybe_relaunch(opts):
        ref = resolve_parent(stage, opts)
        return result_from_checkpoint(stage, opts.output_tag or ref.tag, opts.home, wall0)
    info = dist.init_distributed(opts.device) if not opts.dry_run else None
    try:
        return run(opts, info, wall0)
    finally:
        if info is not None:
            dist.cleanup()


def resolve_parent(stage: str, opts: PostOptions) -> Any:
    """The checkpoint this stage starts from; an error naming the command to run when there is none."""
    from nanoctl.checkpoint import find_checkpoint, resolve_checkpoint_path

    if opts.checkpoint:
        return resolve_checkpoint_path(opts.checkpoint, opts.model_step)
    if opts.source:
        if opts.source not in SOURCE_COMMANDS:
            raise UsageError(f"--source {opts.source!r} is not one of base, mid, sft, rl")
        return find_checkpoint(opts.source, opts.model_tag, opts.model_step, opts.home)
    parents = PARENTS[stage]
    for parent in parents:
        try:
            return find_checkpoint(parent, opts.model_tag, opts.model_step, opts.home)
        except NanoctlError:
            continue
    tag = f" with tag {opts.model_tag!r}" if opts.model_tag else ""
    raise NanoctlError(
        f"no {' or '.join(parents)} checkpoint{tag} to start {stage} from",
        f"run {MISSING_PARENT_HINT[stage]} first (or pass --checkpoint DIR)",
    )


def read_parent_meta(ref: Any) -> dict[str, Any]:
    import json

    from nanoctl.checkpoint import meta_path

    return json.loads(meta_path(ref.directory, ref.step).read_text())


def lineage(ref: Any) -> dict[str, Any]:
    return {"stage": ref.stage, "tag": ref.tag, "step": ref.step}


def maybe_relaunch(opts: PostOptions) -> bool:
    """Re-run the same command under torch.distributed.run when more than one process was asked for."""
    from nanoctl import dist

    if opts.dry_run or not dist.wants_relaunch(opts.nproc_per_node, opts.nnodes):
        return False
    say(
        "launching: "
        + dist.format_command(
            dist.torchrun_command(opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint)
        )
    )
    dist.relaunch_with_torchrun(opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint)
    return True


def launch_line(opts: PostOptions) -> str | None:
    from nanoctl import dist

    if opts.nproc_per_node > 1 or opts.nnodes > 1:
        return "launch: " + dist.format_command(
            dist.torchrun_command(opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint)
        )
    return None


def result_from_checkpoint(stage: str, tag: str, home: Any, wall0: float) -> StageResult:
    """After a torchrun re-launch: read what the workers wrote."""
    import json

    from nanoctl.home import Home
    from nanoctl.train.loop import find_resume_step

    ckpt = Home.resolve(home).checkpoint_dir(stage, tag)
    step = find_resume_step(ckpt)
    meta = json.loads((ckpt / f"meta_{step:06d}.json").read_text()) if step is not None else {}
    return StageResult(
        stage=stage,
        model_tag=tag,
        checkpoint_dir=str(ckpt),
        parent=meta.get("parent"),
        final_step=step or 0,
        num_iterations=meta.get("num_iterations", step or 0),
        final_loss=meta.get("train_loss"),
        val_loss=meta.get("val_loss"),
        metrics=meta.get("metrics", {}),
        data=meta.get("data", {}),
        total_training_time=meta.get("loop_state", {}).get("total_training_time", 0.0),
        wall_time=time.perf_counter() - wall0,
    )


def output_tag(opts: PostOptions, parent_ref: Any) -> str:
    return opts.output_tag or parent_ref.tag


@dataclass
class OutputState:
    """The stage's checkpoint directory and what is already in it."""

    directory: Path
    report_dir: Path
    resume_step: int | None
    saved_meta: dict[str, Any] | None
    done: bool  # a final checkpoint of the same config exists: nothing to do


def prepare_output(
    stage: str, tag: str, resume_keys: dict[str, Any], opts: PostOptions, master: bool
) -> OutputState:
    """--force wipes; a partial run of the same config resumes; a finished one is left alone."""
    from nanoctl import dist
    from nanoctl.checkpoint import load_checkpoint
    from nanoctl.home import Home
    from nanoctl.train import loop as L

    home = Home.resolve(opts.home)
    directory = home.checkpoint_dir(stage, tag)
    report_dir = home.report_dir(tag) / stage
    resume_step = L.find_resume_step(directory)
    if opts.force and resume_step is not None:
        if master:
            say(f"--force: removing the existing checkpoints in {directory}")
            for f in directory.iterdir():
                if f.name.startswith(("model_", "meta_", "optim_")):
                    f.unlink()
        dist.barrier()
        resume_step = None
    if resume_step is None and opts.resume:
        raise NanoctlError(
            f"--resume: no complete checkpoint in {directory}", "drop --resume to start a new run"
        )
    saved_meta = None
    done = False
    if resume_step is not None:
        _, _, saved_meta = load_checkpoint(directory, resume_step, device="cpu")
        keys = jsonable(resume_keys)
        diffs = L.config_diff(saved_meta.get("resume_keys", {}), keys, keys)
        if diffs:
            raise UsageError(
                f"{stage} checkpoint {tag}@{resume_step} was trained with a different config: "
                + "; ".join(diffs),
                "rerun with the original options, pick another --output-tag, or start over with --force",
            )
        done = bool(saved_meta.get("final"))
    return OutputState(directory, report_dir, resume_step, saved_meta, done)


def skipped_result(stage: str, tag: str, out: OutputState, wall0: float) -> StageResult:
    meta = out.saved_meta or {}
    say(f"already trained: {out.directory} step {out.resume_step} (use --force to retrain)")
    return StageResult(
        stage=stage,
        model_tag=tag,
        checkpoint_dir=str(out.directory),
        parent=meta.get("parent"),
        final_step=out.resume_step or 0,
        num_iterations=meta.get("num_iterations", out.resume_step or 0),
        final_loss=meta.get("train_loss"),
        val_loss=meta.get("val_loss"),
        metrics=meta.get("metrics", {}),
        data=meta.get("data", {}),
        total_training_time=(meta.get("loop_state") or {}).get("total_training_time", 0.0),
        wall_time=time.perf_counter() - wall0,
        skipped=True,
    )


def update_meta(directory: Path, step: int, **updates: Any) -> None:
    """Rewrite a step's meta JSON (atomically) with extra keys, e.g. evals run after the save."""
    import json

    from nanoctl.atomic import atomic_write_json
    from nanoctl.checkpoint import meta_path

    path = meta_path(directory, step)
    meta = json.loads(path.read_text())
    meta.update(jsonable(updates))
    atomic_write_json(path, meta)


def jsonable(obj: Any) -> Any:
    """JSON round-trip rules (tuples -> lists, inf -> None, paths -> str) so saved and fresh compare equal."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def user_config(opts: Any) -> dict[str, Any]:
    """The options as JSON (library-only Task objects are recorded by name, never deep-copied)."""
    from dataclasses import fields

    cfg: dict[str, Any] = {}
    for f in fields(opts):
        if f.name in ("home", "dry_run"):
            continue
        value = getattr(opts, f.name)
        if value is not None and not isinstance(value, (str, int, float, bool, list, tuple, dict, Path)):
            value = getattr(value, "name", type(value).__name__)
        cfg[f.name] = value
    return jsonable(cfg)


def setup_runtime(opts: PostOptions, info: Any) -> tuple[Any, str]:
    """Seed, CPU threads, compute dtype (with the reason)."""
    import torch

    from nanoctl.device import compute_dtype_with_reason
    from nanoctl.train import loop as L

    L.seed_everything(opts.seed)
    if info.device.type == "cpu":
        L.set_cpu_threads(opts.threads)
    dtype, reason = compute_dtype_with_reason(info.device, opts.dtype)
    del torch
    return dtype, reason


def load_parent_model(ref: Any, info: Any, dtype: Any, opts: PostOptions) -> tuple[Any, Any, dict[str, Any]]:
    from nanoctl.checkpoint import load_model

    return load_model(ref, device=info.device, dtype=dtype, home=opts.home, phase="train")


def setup_optimizer(model: Any, opts: PostOptions, init_lr_frac: float) -> Any:
    """The stage's MuonAdamW with every group's LR (and its schedule base) scaled by init_lr_frac."""
    optimizer = model.setup_optimizer(
        unembedding_lr=opts.unembedding_lr,
        embedding_lr=opts.embedding_lr,
        matrix_lr=opts.matrix_lr,
        scalar_lr=opts.scalar_lr,
        weight_decay=opts.weight_decay,
    )
    for group in optimizer.param_groups:
        group["lr"] *= init_lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer


@dataclass
class ResumeState:
    """What a post-training loop restores from its own latest checkpoint (defaults when starting fresh)."""

    loop_state: Any
    cursor: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's meta, for stage-specific extras


def restore_training(out: OutputState, model: Any, optimizer: Any, info: Any, master: bool) -> ResumeState:
    """Load weights, optimizer shard, loop state, this rank's data cursor and RNG when resuming."""
    from nanoctl.train import loop as L

    if out.resume_step is None:
        return ResumeState(loop_state=L.LoopState())
    from nanoctl.checkpoint import load_checkpoint

    model_sd, optim_sd, meta = load_checkpoint(
        out.directory, out.resume_step, device=info.device, load_optimizer=True, rank=info.rank
    )
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)
    del model_sd, optim_sd
    loader = L.rank_loader_state(meta.get("loader_state"), info.rank, info.world_size) or {}
    L.restore_rng_state(meta.get("rng_state"))
    say(f"resuming from step {out.resume_step} ({out.directory})", master)
    return ResumeState(L.LoopState.from_dict(meta.get("loop_state")), loader.get("cursor", 0), meta)


# --- rendering -----------------------------------------------------------------------------------------------


@dataclass
class RenderStats:
    """How many conversations were rendered, cropped to the context, or dropped (nothing to learn)."""

    rendered: int = 0
    cropped: int = 0
    dropped: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


RENDER_ALL = 1 << 30  # "no limit" for render_conversation


def render_cropped(
    tokenizer: Any, conversation: dict[str, Any], max_len: int, stats: RenderStats
) -> tuple[list[int], list[int]]:
    """Render, then crop to `max_len` tokens (= context + 1, so inputs fit the context), counting crops.

    Rendering with nanochat's default max_tokens=2048 at a shorter context is the NaN-loss bug (PR #834);
    here the crop always matches the row length.
    """
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=RENDER_ALL)
    stats.rendered += 1
    if len(ids) > max_len:
        stats.cropped += 1
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


# --- quick evals -----------------------------------------------------------------------------------------


def letter_token_ids(tokenizer: Any, letters: Any) -> list[int]:
    """The token of each answer letter (nanochat: "A" with no leading space is one token)."""
    ids = []
    for letter in letters:
        toks = tokenizer.encode(letter)
        ids.append(toks[0])
    return ids


def categorical_accuracy(
    model: Any, tokenizer: Any, task: Any, max_problems: int, batch_size: int, info: Any
) -> float:
    """nanochat's categorical eval: one forward per batch of prompts (BOS-padded), logits at the last
    prompt position restricted to the letters, argmax. Prompts longer than the context keep their end.
    Problems are strided across ranks and the counts all-reduced."""
    import torch
    import torch.distributed as dist

    from nanoctl.train.loop import unwrap

    m = unwrap(model)
    ctx = int(m.config.sequence_len)
    device = info.device
    bos = tokenizer.get_bos_token_id()
    n = min(len(task), max_problems) if max_problems > 0 else len(task)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            for b0 in range(info.rank * batch_size, n, batch_size * info.world_size):
                convs = [task[i] for i in range(b0, min(b0 + batch_size, n))]
                prompts = [tokenizer.render_for_completion(c)[-ctx:] for c in convs]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), width), bos, dtype=torch.long)
                for i, p in enumerate(prompts):
                    ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
                logits = m(ids.to(device))
                for i, conv in enumerate(convs):
                    letters = list(conv["letters"])
                    focus = logits[i, len(prompts[i]) - 1, letter_token_ids(tokenizer, letters)]
                    pred = letters[int(focus.argmax().item())]
                    counts[0] += float(bool(task.evaluate(conv, pred)))
                    counts[1] += 1
    finally:
        m.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")


def load_metric_tasks(names: Any, data_dir: Any, home: Any) -> tuple[dict[str, Any], list[str]]:
    """Build the quick-accuracy tasks that are available; the rest are reported as skipped."""
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
            raise UsageError(
                f"--metric-task {name} is not a multiple-choice task", "use MMLU, ARC-Easy or ARC-Challenge"
            )
        tasks[name] = task
    return tasks, skipped


# --- the loop scaffolding ------------------------------------------------------------------------------------


class StageRun:
    """Per-run plumbing shared by the stage loops: metrics, step lines, Ctrl+C, checkpoints."""

    def __init__(
        self,
        stage: str,
        info: Any,
        out: OutputState,
        num_steps: int,
        start_step: int,
        base_meta: dict[str, Any],
        keep_last: int,
        wandb_run: str | None,
        config: dict[str, Any],
    ) -> None:
        from nanoctl.metrics import MetricsLogger
        from nanoctl.train import loop as L

        self.stage, self.info, self.out = stage, info, out
        self.master = info.is_master
        self.base_meta = base_meta
        self.keep_last = keep_last
        self.metrics = MetricsLogger(
            out.report_dir,
            wandb_project=f"nanoctl-{stage}",
            wandb_run=wandb_run,
            rank=info.rank,
            config=config,
            truncate_after_step=start_step if out.resume_step is not None else -1,
        )
        self.reporter = L.Reporter(num_steps, start=start_step, enabled=self.master)
        self.stop = L.StopSignal()
        self.step_times: list[float] = []

    def print(self, msg: str) -> None:
        self.reporter.print(msg)

    def save(self, step: int, model: Any, optimizer: Any, final: bool, **meta: Any) -> None:
        from nanoctl.train import loop as L

        full = dict(self.base_meta)
        full.update(meta)
        full.update({"step": step, "final": final, "rng_state": L.rng_state_b64()})
        L.save_training_checkpoint(
            self.out.directory, step, model, optimizer, jsonable(full), self.info, self.keep_last
        )
        self.print(f"saved checkpoint {self.out.directory}/model_{step:06d}.pt")

    def eta(self, remaining_steps: int) -> float:
        recent = self.step_times[-20:]
        return remaining_steps * (sum(recent) / len(recent)) if recent else float("nan")

    def close(self) -> None:
        self.reporter.close()
        self.metrics.close()
