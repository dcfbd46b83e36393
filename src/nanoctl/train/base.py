"""Pretraining (`nanoctl pretrain`): nanochat HEAD's base_train, readable top to bottom.

    plan_pretrain(opts)  the depth dial: model shape, batch size, LR/WD scaling, horizon (no weights)
    pretrain(opts)       re-launch under torchrun if asked, else train -> checkpoints/base/<tag>/

On a machine without CUDA the defaults switch to a tiny config (CPU_PRESET) that finishes in minutes
on a laptop, so `nanoctl pretrain` with no options always does something useful.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.errors import Interrupted, NanoctlError, UsageError

B_REF = 2**19  # reference total batch (tokens) of the d12 reference model
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # "Power Lines" (arXiv 2505.13738): B_opt ∝ D^0.383
DEFAULT_VOCAB = 32768  # only for --dry-run without a tokenizer

# nanochat HEAD defaults (used on CUDA) and the CPU preset (used when no CUDA and the flag is not given).
GPU_DEFAULTS: dict[str, Any] = dict(
    depth=20,
    max_seq_len=2048,
    head_dim=128,
    window_pattern="SSSL",
    device_batch_size=32,
    total_batch_size=-1,
    num_iterations=-1,
    warmup_steps=40,
    eval_every=250,
    eval_tokens=80 * 524288,
    sample_every=2000,
    core_metric_every=2000,
    lr_scale=None,  # nanochat: sqrt(total_batch / 2^19)
)
LR_SCALE_CPU = 0.5  # measured on the embedded sample; see bench/RESULTS.md ("CPU preset learning rate")
CPU_PRESET: dict[str, Any] = dict(
    depth=4,
    max_seq_len=256,
    head_dim=64,
    window_pattern="L",  # sliding windows only pay off with FA3 on GPU
    device_batch_size=4,
    total_batch_size=0,  # = device batch x seq x processes: no grad accumulation
    num_iterations=200,  # ~1 s/step at vocab 32768 on 2 cores: a few minutes
    warmup_steps=10,
    eval_every=50,
    eval_tokens=8 * 1024,
    sample_every=-1,  # only at the end
    core_metric_every=-1,  # CORE takes minutes on a CPU: run `nanoctl eval base` instead
    lr_scale=LR_SCALE_CPU,
)


@dataclass
class PretrainOptions:
    """Options of `nanoctl pretrain`. None = the device default (GPU_DEFAULTS on CUDA, else CPU_PRESET)."""

    # model
    depth: int | None = None
    aspect_ratio: int = 64
    head_dim: int | None = None
    max_seq_len: int | None = None
    window_pattern: str | None = None
    arch: str = "current"
    # horizon (precedence: num_iterations > target_flops > target_param_data_ratio)
    num_iterations: int | None = None
    target_flops: float = -1.0
    target_param_data_ratio: float = 12.0
    # batch
    device_batch_size: int | None = None
    total_batch_size: int | None = None  # -1 = auto (Power Lines)
    # optimizer
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.28
    # Multiplier on every LR. None: nanochat's sqrt(total_batch / 2^19) (the CPU preset sets its own,
    # since that rule starves a 1k-token batch of learning rate).
    lr_scale: float | None = None
    warmup_steps: int | None = None
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    # eval / output
    eval_every: int | None = None
    eval_tokens: int | None = None
    sample_every: int | None = None
    core_metric_every: int | None = None
    core_metric_max_per_task: int = 500
    save_every: int = -1
    keep_last: int = 0
    model_tag: str | None = None
    # runtime
    device: str = "auto"
    dtype: str | None = None
    seed: int = 42
    threads: int | None = None
    compile: str = "auto"
    resume: bool = False
    force: bool = False
    wandb_run: str | None = None
    dry_run: bool = False
    home: str | os.PathLike[str] | None = None
    # distributed
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None


@dataclass
class PretrainPlan:
    """Everything derived from the options before any weight exists (what --dry-run prints)."""

    preset: str  # "cpu" | "gpu"
    depth: int
    model_tag: str
    model_config: dict[str, Any]
    params: dict[str, int]
    flops_per_token: float
    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    world_size: int
    grad_accum_steps: int
    num_iterations: int
    horizon_source: str
    target_tokens: int
    total_tokens: int
    tokens_per_param: float
    total_flops: float
    batch_lr_scale: float
    weight_decay: float  # scaled Muon weight decay
    lrs: dict[str, float]
    warmup_steps: int
    eval_every: int
    eval_tokens: int
    sample_every: int
    core_metric_every: int
    vocab_size: int
    torchrun_command: str | None = None
    notes: list[str] = field(default_factory=list)

    def resume_keys(self) -> dict[str, Any]:
        """What must match for a resume to continue the same run (flag names as the user sees them)."""
        return {
            "model_config": self.model_config,
            "--max-seq-len": self.max_seq_len,
            "--device-batch-size": self.device_batch_size,
            "--total-batch-size": self.total_batch_size,
            "world size (--nproc-per-node x --nnodes)": self.world_size,
            "--num-iterations": self.num_iterations,
            "lrs": self.lrs,
            "--weight-decay (scaled)": self.weight_decay,
            "--warmup-steps": self.warmup_steps,
        }

    def lines(self) -> list[str]:
        p = self.params
        out = [
            f"preset: {self.preset} defaults"
            + (" (no CUDA: tiny config for a CPU run)" if self.preset == "cpu" else ""),
            f"model: depth {self.depth}, width {self.model_config['n_embd']}, heads {self.model_config['n_head']}"
            f" (head dim {self.model_config['n_embd'] // self.model_config['n_head']}), seq {self.max_seq_len},"
            f" window {self.model_config['window_pattern']}, arch {self.model_config['arch']}, vocab {self.vocab_size}",
            "params: " + ", ".join(f"{k} {v:,}" for k, v in p.items()),
            f"FLOPs/token: {self.flops_per_token:.3e}",
            f"batch: {self.total_batch_size:,} tokens/step = {self.device_batch_size} rows x {self.max_seq_len} tokens"
            f" x {self.world_size} process(es) x {self.grad_accum_steps} grad accum step(s)",
            f"LR scale {self.batch_lr_scale:.4f}; LRs: "
            + ", ".join(f"{k} {v:.5g}" for k, v in self.lrs.items()),
            f"Muon weight decay (scaled): {self.weight_decay:.5g}",
            f"horizon ({self.horizon_source}): {self.num_iterations:,} iterations, {self.total_tokens:,} tokens,"
            f" tokens:params {self.tokens_per_param:.2f}, total FLOPs {self.total_flops:.3e}",
            f"schedule: warmup {self.warmup_steps} steps; eval every {self.eval_every} steps"
            f" ({self.eval_tokens:,} tokens); samples every {self.sample_every if self.sample_every > 0 else 'run end'};"
            + (
                f" CORE every {self.core_metric_every} steps"
                if self.core_metric_every > 0
                else " CORE off (run `nanoctl eval base` after training)"
            ),
        ]
        if self.torchrun_command:
            out.append(f"launch: {self.torchrun_command}")
        return out + self.notes


@dataclass
class PretrainResult:
    model_tag: str
    checkpoint_dir: str
    final_step: int
    num_iterations: int
    val_bpb: float | None
    min_val_bpb: float | None
    final_loss: float | None
    total_training_time: float  # seconds, excluding the first 10 steps (nanochat's rule)
    wall_time: float
    tokens_per_sec: float | None
    resumed_from: int | None
    skipped: bool = False  # the run was already complete
    plan: dict[str, Any] | None = None
    core_metric: float | None = None  # the last CORE measured during the run (--core-metric-every)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the depth dial ---------------------------------------------------------------------------------------


def _resolve_defaults(opts: PretrainOptions, device_type: str) -> tuple[dict[str, Any], str]:
    preset = "cpu" if device_type != "cuda" else "gpu"
    table = CPU_PRESET if preset == "cpu" else GPU_DEFAULTS
    vals = {k: (getattr(opts, k) if getattr(opts, k) is not None else v) for k, v in table.items()}
    # an explicitly chosen horizon disables the preset's fixed iteration count
    if opts.num_iterations is None and preset == "cpu" and opts.target_flops > 0:
        vals["num_iterations"] = -1
    return vals, preset


def _meta_model(config: Any) -> Any:
    import torch

    from nanoctl.model.gpt import GPT

    with torch.device("meta"):
        return GPT(config, dtype=torch.float32)


def plan_pretrain(
    opts: PretrainOptions, vocab_size: int, device_type: str, world_size: int = 1
) -> PretrainPlan:
    """nanochat HEAD's scaling rules (see reference §3 "Scaling with batch/horizon")."""
    from nanoctl.dist import format_command, torchrun_command
    from nanoctl.model.gpt import config_for_depth

    v, preset = _resolve_defaults(opts, device_type)
    depth, seq = v["depth"], v["max_seq_len"]
    for name, val in (
        ("--depth", depth),
        ("--max-seq-len", seq),
        ("--device-batch-size", v["device_batch_size"]),
    ):
        if val < 1:
            raise UsageError(f"{name} must be >= 1, got {val}")
    config = config_for_depth(
        depth, vocab_size, seq, opts.aspect_ratio, v["head_dim"], v["window_pattern"], opts.arch
    )
    model = _meta_model(config)
    params = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    scaling = params["transformer_matrices"] + params["lm_head"]
    ref = _meta_model(
        config_for_depth(
            REF_DEPTH, vocab_size, seq, opts.aspect_ratio, v["head_dim"], v["window_pattern"], opts.arch
        )
    )
    ref_params = ref.num_scaling_params()
    ratio = opts.target_param_data_ratio
    target_tokens = int(ratio * scaling)
    d_ref = ratio * (ref_params["transformer_matrices"] + ref_params["lm_head"])

    # total batch: auto (Power Lines) unless given
    total = v["total_batch_size"]
    if total == 0:  # CPU preset: one micro-batch per process, no grad accumulation
        total = v["device_batch_size"] * seq * world_size
    if total == -1:
        total = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** BATCH_EXPONENT))
    B, T = v["device_batch_size"], seq
    per_step = B * T * world_size
    if total % per_step:
        raise UsageError(
            f"--total-batch-size {total:,} is not a multiple of --device-batch-size x --max-seq-len x processes"
            f" = {B} x {T} x {world_size} = {per_step:,}",
            f"use --total-batch-size {max(1, round(total / per_step)) * per_step} or change --device-batch-size",
        )
    grad_accum = total // per_step

    batch_lr_scale = v["lr_scale"] if v.get("lr_scale") is not None else math.sqrt(total / B_REF)
    wd_scaled = opts.weight_decay * math.sqrt(total / B_REF) * (d_ref / target_tokens)

    iters = v["num_iterations"]
    if iters is not None and iters > 0:
        source = "--num-iterations" + (
            " (CPU preset)" if preset == "cpu" and opts.num_iterations is None else ""
        )
    elif opts.target_flops > 0:
        iters = round(opts.target_flops / (flops_per_token * total))
        source = "--target-flops"
    elif ratio > 0:
        iters = target_tokens // total
        source = f"--target-param-data-ratio {ratio:g}"
    else:
        raise UsageError(
            "no training horizon", "give --num-iterations, --target-flops or --target-param-data-ratio > 0"
        )
    if iters < 1:
        raise UsageError(
            f"the horizon gives {iters} iterations", "raise --num-iterations / --target-flops / ratio"
        )
    total_tokens = iters * total

    eval_tokens = v["eval_tokens"]
    tag = opts.model_tag or f"d{depth}"
    lrs = {
        "embedding": opts.embedding_lr * batch_lr_scale,
        "unembedding": opts.unembedding_lr * batch_lr_scale,
        "matrix": opts.matrix_lr * batch_lr_scale,
        "scalar": opts.scalar_lr * batch_lr_scale,
    }
    cmd = None
    if opts.nproc_per_node > 1 or opts.nnodes > 1:
        cmd = format_command(
            torchrun_command(
                opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, options_argv(opts)
            )
        )
    plan = PretrainPlan(
        preset=preset,
        depth=depth,
        model_tag=tag,
        model_config=config.to_dict(),
        params=params,
        flops_per_token=flops_per_token,
        max_seq_len=seq,
        device_batch_size=B,
        total_batch_size=total,
        world_size=world_size,
        grad_accum_steps=grad_accum,
        num_iterations=iters,
        horizon_source=source,
        target_tokens=target_tokens,
        total_tokens=total_tokens,
        tokens_per_param=total_tokens / scaling,
        total_flops=flops_per_token * total_tokens,
        batch_lr_scale=batch_lr_scale,
        weight_decay=wd_scaled,
        lrs=lrs,
        warmup_steps=v["warmup_steps"],
        eval_every=v["eval_every"],
        eval_tokens=eval_tokens,
        sample_every=v["sample_every"],
        core_metric_every=v["core_metric_every"],
        vocab_size=vocab_size,
        torchrun_command=cmd,
    )
    return plan


# --- training ----------------------------------------------------------------------------------------------


def pretrain(opts: PretrainOptions) -> PretrainResult:
    """Train a base model; see the module docstring. Raises NanoctlError/UsageError/Interrupted."""
    from nanoctl import dist

    if opts.home is not None:
        os.environ["NANOCTL_HOME"] = str(Path(opts.home).expanduser().resolve())
    if not opts.dry_run and dist.wants_relaunch(opts.nproc_per_node, opts.nnodes):
        return _relaunch(opts)
    if opts.dry_run:
        return _dry_run(opts)
    info = dist.init_distributed(opts.device)
    try:
        return _train(opts, info)
    finally:
        dist.cleanup()


def _say(msg: str, master: bool = True) -> None:
    import sys

    if master:
        print(msg, file=sys.stderr, flush=True)


def _vocab_or_default(home: Any) -> tuple[int, str | None]:
    try:
        from nanoctl.tokenizer import load_tokenizer

        return load_tokenizer(home).get_vocab_size(), None
    except NanoctlError as e:
        return DEFAULT_VOCAB, f"note: {e.message}; the plan assumes vocab {DEFAULT_VOCAB}"
    except ImportError:
        return DEFAULT_VOCAB, f"note: no tokenizer module; the plan assumes vocab {DEFAULT_VOCAB}"


def _dry_run(opts: PretrainOptions) -> PretrainResult:
    from nanoctl.device import resolve_device
    from nanoctl.home import Home

    device = resolve_device(opts.device)
    vocab, note = _vocab_or_default(opts.home)
    plan = plan_pretrain(opts, vocab, device.type, world_size=opts.nproc_per_node * opts.nnodes)
    if note:
        plan.notes.append(note)
    for line in plan.lines():
        _say(line)
    ckpt = Home.resolve(opts.home).checkpoint_dir("base", plan.model_tag)
    return PretrainResult(
        model_tag=plan.model_tag,
        checkpoint_dir=str(ckpt),
        final_step=0,
        num_iterations=plan.num_iterations,
        val_bpb=None,
        min_val_bpb=None,
        final_loss=None,
        total_training_time=0.0,
        wall_time=0.0,
        tokens_per_sec=None,
        resumed_from=None,
        skipped=True,
        plan=asdict(plan),
    )


_NOT_FORWARDED = {"home", "dry_run", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint"}


def options_argv(opts: PretrainOptions) -> list[str]:
    """`pretrain --flag value ...` for every option that differs from its default: what each worker runs.

    Built from the options (not sys.argv) so library callers can re-launch too; the home travels in
    NANOCTL_HOME.
    """
    from dataclasses import fields

    argv = ["pretrain"]
    for f in fields(PretrainOptions):
        if f.name in _NOT_FORWARDED:
            continue
        value = getattr(opts, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag)  # bool options default to False
        else:
            argv += [flag, str(value)]
    return argv


def _relaunch(opts: PretrainOptions) -> PretrainResult:
    """Run the same command under torch.distributed.run; the result comes from the final checkpoint."""
    from nanoctl import dist
    from nanoctl.device import resolve_device
    from nanoctl.home import Home

    # fail fast on usage errors here rather than once per worker
    vocab, _ = _vocab_or_default(opts.home)
    plan = plan_pretrain(opts, vocab, resolve_device(opts.device).type, opts.nproc_per_node * opts.nnodes)
    _say(
        "launching: "
        + dist.format_command(
            dist.torchrun_command(
                opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, options_argv(opts)
            )
        )
    )
    t0 = time.perf_counter()
    dist.relaunch_with_torchrun(
        opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, options_argv(opts)
    )
    import json

    from nanoctl.train.loop import find_resume_step

    tag = plan.model_tag
    home = Home.resolve(opts.home)
    ckpt = home.checkpoint_dir("base", tag)
    step = find_resume_step(ckpt)
    meta = json.loads((ckpt / f"meta_{step:06d}.json").read_text()) if step is not None else {}
    loop = meta.get("loop_state", {})
    return PretrainResult(
        model_tag=tag,
        checkpoint_dir=str(ckpt),
        final_step=step or 0,
        num_iterations=plan.num_iterations,
        val_bpb=meta.get("val_bpb"),
        min_val_bpb=loop.get("min_val_bpb"),
        final_loss=meta.get("train_loss"),
        total_training_time=loop.get("total_training_time", 0.0),
        wall_time=time.perf_counter() - t0,
        tokens_per_sec=None,
        resumed_from=None,
        plan=asdict(plan),
    )


def _train(opts: PretrainOptions, info: Any) -> PretrainResult:
    import torch

    from nanoctl import dist
    from nanoctl.checkpoint import load_checkpoint, save_tokenizer_copy
    from nanoctl.data.loader import DataLoader, val_loader
    from nanoctl.data.shards import resolve_pretrain_shards
    from nanoctl.device import (
        compute_dtype_with_reason,
        device_name,
        max_memory_allocated_mib,
        peak_flops,
        synchronize,
    )
    from nanoctl.evaluate.bpb import evaluate_bpb
    from nanoctl.home import Home
    from nanoctl.metrics import MetricsLogger
    from nanoctl.model.gpt import GPTConfig, build_model
    from nanoctl.tokenizer import load_token_bytes, load_tokenizer
    from nanoctl.train import loop as L

    wall0 = time.perf_counter()
    master = info.is_master
    device = info.device
    say = lambda msg: _say(msg, master)  # noqa: E731

    # --- setup: determinism, tokenizer, plan -------------------------------------------------------------
    L.seed_everything(opts.seed)
    if device.type == "cpu":
        threads = L.set_cpu_threads(opts.threads)
    else:
        threads = torch.get_num_threads()
    dtype, dtype_reason = compute_dtype_with_reason(device, opts.dtype)
    tokenizer = load_tokenizer(opts.home)
    token_bytes = load_token_bytes(opts.home, device=device)
    plan = plan_pretrain(opts, tokenizer.get_vocab_size(), device.type, info.world_size)
    home = Home.resolve(opts.home)
    ckpt_dir = home.checkpoint_dir("base", plan.model_tag)
    report_dir = home.report_dir(plan.model_tag)

    say(
        f"nanoctl pretrain: {plan.model_tag} on {device_name(device)} ({device.type}, {info.world_size} process(es))"
    )
    say(
        f"compute dtype: {str(dtype).removeprefix('torch.')} ({dtype_reason})"
        + (f"; {threads} CPU threads" if device.type == "cpu" else "")
    )
    for line in plan.lines():
        say(line)

    # shards: rank 0 materializes the embedded sample if needed, the others wait and reuse it
    if master:
        shards = resolve_pretrain_shards(opts.home)
    dist.barrier()
    if not master:
        shards = resolve_pretrain_shards(opts.home)
    if len(shards.paths) < 2:
        raise NanoctlError(
            f"pretraining needs >= 2 shards (train + val) in {shards.directory}",
            "run `nanoctl data download`",
        )
    say(
        f"data: {len(shards.train_paths)} train shard(s) + 1 val shard in {shards.directory}"
        + (" (using embedded sample; run `nanoctl data download` for real data)" if shards.is_sample else "")
    )

    # --- resume or fresh -------------------------------------------------------------------------------
    resume_step = L.find_resume_step(ckpt_dir)
    saved_meta: dict[str, Any] | None = None
    if opts.force and resume_step is not None:
        if master:
            say(f"--force: removing the existing checkpoints in {ckpt_dir}")
            for f in ckpt_dir.iterdir():
                if f.name.startswith(("model_", "meta_", "optim_")):
                    f.unlink()
        dist.barrier()
        resume_step = None
    if resume_step is None and opts.resume:
        raise NanoctlError(
            f"--resume: no complete checkpoint in {ckpt_dir}", "drop --resume to start a new run"
        )
    if resume_step is not None:
        _, _, saved_meta = load_checkpoint(ckpt_dir, resume_step, device="cpu")
        diffs = L.config_diff(
            saved_meta.get("resume_keys", {}), _jsonable(plan.resume_keys()), plan.resume_keys()
        )
        if diffs:
            raise UsageError(
                f"checkpoint {ckpt_dir.name}@{resume_step} was trained with a different config: "
                + "; ".join(diffs),
                "rerun with the original options, pick another --model-tag, or start over with --force",
            )
        if resume_step >= plan.num_iterations and saved_meta.get("final"):
            say(f"already trained: {ckpt_dir} step {resume_step} (use --force to retrain)")
            loop_state = L.LoopState.from_dict(saved_meta.get("loop_state"))
            return PretrainResult(
                model_tag=plan.model_tag,
                checkpoint_dir=str(ckpt_dir),
                final_step=resume_step,
                num_iterations=plan.num_iterations,
                val_bpb=saved_meta.get("val_bpb"),
                min_val_bpb=None if not math.isfinite(loop_state.min_val_bpb) else loop_state.min_val_bpb,
                final_loss=saved_meta.get("train_loss"),
                total_training_time=loop_state.total_training_time,
                wall_time=time.perf_counter() - wall0,
                tokens_per_sec=None,
                resumed_from=None,
                skipped=True,
                plan=asdict(plan),
            )
        say(f"resuming from step {resume_step} ({ckpt_dir})")

    # --- model + optimizer -----------------------------------------------------------------------------
    config = GPTConfig.from_dict(plan.model_config)
    model = build_model(config, device=device, dtype=dtype)
    optimizer = model.setup_optimizer(
        unembedding_lr=plan.lrs["unembedding"],
        embedding_lr=plan.lrs["embedding"],
        matrix_lr=plan.lrs["matrix"],
        scalar_lr=plan.lrs["scalar"],
        weight_decay=plan.weight_decay,
    )
    loop_state = L.LoopState()
    loader_state = None
    if resume_step is not None:
        model_sd, optim_sd, meta = load_checkpoint(
            ckpt_dir, resume_step, device=device, load_optimizer=True, rank=info.rank
        )
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        del model_sd, optim_sd
        loop_state = L.LoopState.from_dict(meta.get("loop_state"))
        loader_state = L.rank_loader_state(meta.get("loader_state"), info.rank, info.world_size)
        L.restore_rng_state(meta.get("rng_state"))
    scaler = L.LossScaler(dtype == torch.float16, loop_state.loss_scaler)  # fp16 only, as nanochat
    orig_model = model
    flex = False
    if L.want_compile(opts.compile, device):
        flex = model.prepare_flex_attention(plan.max_seq_len)
        say("compiling the model (torch.compile, dynamic=False)")
        model = torch.compile(model, dynamic=False)
    say(f"attention: {orig_model.attention_summary(plan.max_seq_len, flex)}")

    # --- data ------------------------------------------------------------------------------------------
    B, T = plan.device_batch_size, plan.max_seq_len
    train_loader = DataLoader(
        tokenizer,
        shards.train_paths,
        B,
        T,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
        state=loader_state,
    )
    eval_steps = max(1, plan.eval_tokens // (B * T * info.world_size))

    def run_eval() -> float:
        model.eval()
        with val_loader(
            tokenizer, shards.val_path, B, T, rank=info.rank, world_size=info.world_size, device=device
        ) as vl:
            bpb = evaluate_bpb(orig_model, vl, eval_steps, token_bytes)
        model.train()
        return bpb

    core_state: dict[str, Any] = {"bundle": None, "skipped": False}

    def run_core() -> float | None:
        """CORE on the uncompiled model (nanochat's --core-metric-every); None when no bundle is local."""
        from nanoctl.evaluate.core import evaluate_core, resolve_bundle

        if core_state["skipped"]:
            return None
        if core_state["bundle"] is None:
            try:  # never downloads mid-run: a missing bundle skips CORE with a note instead
                core_state["bundle"] = resolve_bundle(home=opts.home, download=False)
            except NanoctlError as e:
                core_state["skipped"] = True
                say(f"CORE during training skipped: {e.message} (`nanoctl eval base` downloads it)")
                return None
        model.eval()
        result = evaluate_core(
            orig_model, tokenizer, device, core_state["bundle"], max_per_task=opts.core_metric_max_per_task
        )
        model.train()
        return result.core

    # --- outputs: metrics + run config ------------------------------------------------------------------
    user_config = _jsonable({k: v for k, v in asdict(opts).items() if k not in ("home", "dry_run")})
    start_step = resume_step or 0
    metrics = MetricsLogger(
        report_dir,
        wandb_project="nanoctl",
        wandb_run=opts.wandb_run,
        rank=info.rank,
        config={"options": user_config, "plan": _jsonable(asdict(plan))},
        truncate_after_step=start_step if resume_step is not None else -1,
    )
    if master:
        from nanoctl.atomic import atomic_write_json

        atomic_write_json(
            report_dir / "pretrain_config.json", {"options": user_config, "plan": _jsonable(asdict(plan))}
        )
        save_tokenizer_copy(ckpt_dir, opts.home)

    ema = L.LossEMA.from_state(loop_state.ema)
    peak = peak_flops(device)
    tokens_per_step = plan.total_batch_size
    last_loss: float | None = None
    last_val = loop_state.val_bpb
    gcf = L.GCFreeze()
    reporter = L.Reporter(plan.num_iterations, start=start_step, enabled=master)
    step_times: list[float] = []
    session_time = 0.0  # training time in this process, excluding its first 10 steps

    def checkpoint(step: int, final: bool) -> None:
        loop_state.step = step
        loop_state.ema = ema.state_dict()
        meta = {
            "step": step,
            "stage": "base",
            "model_config": plan.model_config,
            "user_config": user_config,
            "resume_keys": _jsonable(plan.resume_keys()),
            "parent": None,
            "device_batch_size": B,
            "max_seq_len": T,
            "total_batch_size": plan.total_batch_size,
            "num_iterations": plan.num_iterations,
            "loader_state": L.gather_loader_state(train_loader.state_dict()),
            "loop_state": loop_state.to_dict(),
            "rng_state": L.rng_state_b64(),
            "val_bpb": last_val,
            "train_loss": last_loss,
            "final": final,
        }
        L.save_training_checkpoint(ckpt_dir, step, orig_model, optimizer, meta, info, opts.keep_last)
        say(f"saved checkpoint {ckpt_dir}/model_{step:06d}.pt")

    # --- the loop --------------------------------------------------------------------------------------
    step_sleep = float(
        os.environ.get("NANOCTL_STEP_SLEEP", "0") or 0
    )  # debug/test aid: pause after each step
    step = start_step
    model.train()
    try:
        with L.StopSignal() as stop:
            while True:
                last = step == plan.num_iterations
                if last:
                    # saved before the final evals, so a failing eval never costs the training run
                    checkpoint(step, final=True)
                elif opts.save_every > 0 and step % opts.save_every == 0 and step != start_step:
                    checkpoint(step, final=False)

                if (
                    plan.eval_every > 0
                    and (last or step % plan.eval_every == 0)
                    and not (step == start_step and resume_step is not None)
                ):
                    last_val = run_eval()
                    loop_state.val_bpb = last_val
                    loop_state.min_val_bpb = min(loop_state.min_val_bpb, last_val)
                    reporter.print(f"step {step:05d} | validation bpb: {last_val:.6f}")
                    metrics.log(step, val_bpb=last_val)
                if (
                    plan.core_metric_every > 0
                    and (last or (step > 0 and step % plan.core_metric_every == 0))
                    and not (step == start_step and resume_step is not None)
                ):
                    core = run_core()
                    if core is not None:
                        loop_state.core_metric = core
                        reporter.print(f"step {step:05d} | CORE metric: {core:.4f}")
                        metrics.log(step, core_metric=core)
                if master and (
                    last or (plan.sample_every > 0 and step % plan.sample_every == 0 and step > 0)
                ):
                    for text in L.greedy_samples(orig_model, tokenizer):
                        reporter.print(f"  sample: {text!r}")
                if last:
                    break
                if stop.should_stop(device):
                    if step != start_step or resume_step is None:
                        checkpoint(step, final=False)
                    raise Interrupted(
                        f"stopped at step {step}/{plan.num_iterations}; checkpoint saved in {ckpt_dir}",
                        "rerun the same command to resume",
                    )

                # one optimizer step = grad_accum micro-batches
                synchronize(device)
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=device, dtype=torch.float32)
                try:
                    for _ in range(plan.grad_accum_steps):
                        x, y = next(train_loader)
                        loss = model(x, y)
                        loss_sum += loss.detach().float()
                        scaler.scale_loss(loss / plan.grad_accum_steps).backward()
                    lrm = L.lr_multiplier(
                        step, plan.num_iterations, plan.warmup_steps, opts.warmdown_ratio, opts.final_lr_frac
                    )
                    L.apply_schedules(
                        optimizer,
                        lrm,
                        L.muon_momentum(step, plan.num_iterations, opts.warmdown_ratio),
                        L.muon_weight_decay(step, plan.num_iterations, plan.weight_decay),
                    )
                    if scaler.unscale_and_check(optimizer):
                        optimizer.step()
                    else:
                        reporter.print(
                            f"step {step:05d} | fp16 gradients overflowed: step skipped, "
                            f"loss scale now {scaler.scale:g}"
                        )
                    model.zero_grad(set_to_none=True)
                    loop_state.loss_scaler = scaler.state_dict()
                except torch.OutOfMemoryError as e:
                    raise NanoctlError(
                        f"{device.type.upper()} out of memory at --device-batch-size {B} (seq {T})",
                        "lower --device-batch-size (grad accumulation keeps the same total batch)",
                    ) from e
                train_loss = dist.all_reduce_mean(float(loss_sum.item()) / plan.grad_accum_steps, device)
                synchronize(device)
                dt = time.perf_counter() - t0
                if not math.isfinite(train_loss):
                    raise NanoctlError(
                        f"training loss became {train_loss} at step {step}",
                        "lower the learning rates (--matrix-lr/--embedding-lr) or check the data",
                    )
                step += 1
                last_loss = train_loss
                smooth = ema.update(train_loss)
                done_here = step - start_step
                if done_here > 10:
                    session_time += dt
                    loop_state.total_training_time += dt
                step_times.append(dt)
                recent = step_times[-20:]
                avg_dt = sum(recent) / len(recent)
                tok_s = tokens_per_step / dt
                mfu = (
                    100 * plan.flops_per_token * tokens_per_step / dt / (peak * info.world_size)
                    if peak
                    else None
                )
                epoch = train_loader.state_dict()["epoch"]
                reporter.step(
                    L.StepLine(
                        step=step,
                        num_steps=plan.num_iterations,
                        loss=smooth,
                        lrm=lrm,
                        dt=dt,
                        tok_per_sec=tok_s,
                        mfu=mfu,
                        total_time=loop_state.total_training_time,
                        eta=(plan.num_iterations - step) * avg_dt,
                        extra=f"epoch {epoch}",
                    ),
                    advance_to=step,
                )
                metrics.log(
                    step,
                    loss=train_loss,
                    loss_ema=smooth,
                    lrm=lrm,
                    dt=dt,
                    tok_per_sec=tok_s,
                    mfu=mfu,
                    epoch=epoch,
                )
                gcf.after_step(step)
                if step_sleep:
                    time.sleep(step_sleep)
    finally:
        gcf.close()
        reporter.close()
        train_loader.close()
        metrics.close()

    # final meta gains the final val bpb (the checkpoint itself was written before the evals)
    if master:
        import json

        from nanoctl.atomic import atomic_write_json

        mp = ckpt_dir / f"meta_{step:06d}.json"
        meta = json.loads(mp.read_text())
        meta["val_bpb"] = last_val
        if loop_state.core_metric is not None:
            meta["core_metric"] = loop_state.core_metric
        meta["loop_state"] = loop_state.to_dict() | {"smooth_train_loss": ema.state_dict()}
        atomic_write_json(mp, meta)
    peak_mem = max_memory_allocated_mib(device)
    say(
        f"done: {plan.num_iterations} steps; training time {L.format_duration(loop_state.total_training_time)}"
        + (f"; min val bpb {loop_state.min_val_bpb:.4f}" if math.isfinite(loop_state.min_val_bpb) else "")
        + (f"; peak memory {peak_mem:.0f} MiB" if peak_mem else "")
        + f"; checkpoint {ckpt_dir}"
    )
    measured = [t for t in step_times[10:]] or step_times
    return PretrainResult(
        model_tag=plan.model_tag,
        checkpoint_dir=str(ckpt_dir),
        final_step=step,
        num_iterations=plan.num_iterations,
        val_bpb=last_val,
        min_val_bpb=None if not math.isfinite(loop_state.min_val_bpb) else loop_state.min_val_bpb,
        final_loss=last_loss,
        total_training_time=loop_state.total_training_time,
        wall_time=time.perf_counter() - wall0,
        core_metric=loop_state.core_metric,
        tokens_per_sec=(tokens_per_step * len(measured) / sum(measured)) if measured else None,
        resumed_from=resume_step,
        plan=_jsonable(asdict(plan)),
    )


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON rules (tuples -> lists, inf -> None) so saved and fresh values compare equal."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def remove_run(home: Any, tag: str) -> None:
    """Delete a tag's checkpoints and reports (used by tests and `--force` workflows)."""
    from nanoctl.home import Home

    h = Home.resolve(home)
    shutil.rmtree(h.checkpoint_dir("base", tag), ignore_errors=True)
    shutil.rmtree(h.report_dir(tag), ignore_errors=True)
