"""Pretraining (`nanoctl pretrain`): nanochat HEAD's base_train, on the stage framework.

    plan_pretrain(opts, ...)  the depth dial: model shape, batch size, LR/WD scaling, horizon (no weights)
    pretrain(opts, home)      re-launch under torchrun if asked, else train -> checkpoints/base/<tag>/

On a machine without CUDA the defaults are CPU_PRESET, a tiny config that finishes in minutes on a
laptop, so `nanoctl pretrain` with no options always does something useful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.options import HORIZON, MODEL, OPTIMIZATION, OUTPUT, apply_preset, option
from nanoctl.train.schedules import EVERY, EVERY_AFTER_START, Every
from nanoctl.train.stage import Plan, Run, Stage, StageOptions, StageResult, StepStats, run_stage

B_REF = 2**19  # reference total batch (tokens) of the d12 reference model
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # "Power Lines" (arXiv 2505.13738): B_opt ∝ D^0.383
DEFAULT_VOCAB = 32768  # only for --dry-run without a tokenizer
LR_SCALE_CPU = 0.5  # measured on the embedded sample; see bench/RESULTS.md ("CPU preset learning rate")
CORE_EVERY = Every(at_start=False, end_only=False)  # -1 = never, as nanochat's --core-metric-every


@dataclass
class PretrainOptions(StageOptions):
    """Options of `nanoctl pretrain`. None = the device preset (GPU_PRESET on CUDA, else CPU_PRESET)."""

    depth: int | None = option(None, help="Layers; width, heads, LR/WD scaling and batch follow from it.", panel=MODEL)
    aspect_ratio: int = option(64, help="Width = depth x aspect ratio (rounded up to a multiple of --head-dim).", panel=MODEL)
    head_dim: int | None = option(None, help="Attention head size.", panel=MODEL)
    max_seq_len: int | None = option(None, help="Context length.", unit="tokens", panel=MODEL)
    window_pattern: str | None = option(
        None, help="Sliding-window pattern tiled over layers, L=full S=short.", panel=MODEL
    )
    arch: str = option(
        "current", help="current (nanochat HEAD), classic (Oct 2025, = HF NanoChat) or deepseek (MLA + MoE).",
        panel=MODEL,
    )
    scale: str | None = option(
        None, help="deepseek: nanoDeepSeek's preset, small|base|large (depth/width/heads/experts/top-k).", panel=MODEL
    )
    experts: int | None = option(None, help="deepseek: routed experts per MoE layer (default 8).", panel=MODEL)
    top_k: int | None = option(None, help="deepseek: routed experts per token (default 2).", panel=MODEL)
    shared_experts: int | None = option(None, help="deepseek: always-on shared experts (default 1).", panel=MODEL)
    kv_lora_rank: int | None = option(None, help="deepseek: MLA latent size (default width/4).", panel=MODEL)
    mtp_depth: int | None = option(None, help="deepseek: multi-token prediction modules, 0 or 1 (default 0).", panel=MODEL)
    # horizon (precedence: num_iterations > target_flops > target_param_data_ratio)
    num_iterations: int | None = option(
        None, help="Optimizer steps; wins over the other horizon flags (-1 = from them).", panel=HORIZON
    )
    target_flops: float = option(-1.0, help="Train for this many FLOPs (-1 = off).", panel=HORIZON)
    target_param_data_ratio: float = option(
        12.0, help="Tokens per scaling parameter (Chinchilla-style ratio).", panel=HORIZON
    )
    device_batch_size: int | None = option(None, help="Rows per forward pass per process.", panel=OPTIMIZATION)
    total_batch_size: int | None = option(
        None, help="Tokens per optimizer step; -1 = auto (Power Lines), 0 = device batch x seq x processes.",
        unit="tokens", panel=OPTIMIZATION,
    )
    embedding_lr: float = option(0.3, help="AdamW LR of the token embedding.", panel=OPTIMIZATION)
    unembedding_lr: float = option(0.008, help="AdamW LR of the output head.", panel=OPTIMIZATION)
    matrix_lr: float = option(0.02, help="Muon LR of the transformer matrices.", panel=OPTIMIZATION)
    scalar_lr: float = option(0.5, help="AdamW LR of the residual scalars.", panel=OPTIMIZATION)
    weight_decay: float = option(0.28, help="Muon weight decay before batch/horizon scaling.", panel=OPTIMIZATION)
    # None on CUDA: nanochat's sqrt(total_batch / 2^19); the CPU preset sets its own, since that rule
    # starves a 1k-token batch of learning rate.
    lr_scale: float | None = option(
        None, help="Multiplier on every LR (unset on CUDA: sqrt(total batch / 2^19)).", panel=OPTIMIZATION
    )
    warmup_steps: int | None = option(None, help="LR warmup.", unit="steps", panel=OPTIMIZATION)
    warmdown_ratio: float = option(0.65, help="Fraction of the run spent decaying the LR.", panel=OPTIMIZATION)
    final_lr_frac: float = option(0.05, help="LR at the end as a fraction of the peak.", panel=OPTIMIZATION)
    eval_every: int | None = option(
        None, help=f"Validation bpb every N steps and at the end ({EVERY.rule}).", unit="steps", panel=OUTPUT
    )
    eval_tokens: int | None = option(None, help="Validation tokens per eval.", unit="tokens", panel=OUTPUT)
    sample_every: int | None = option(
        None, help=f"Greedy samples every N steps and at the end ({EVERY_AFTER_START.rule}).", unit="steps", panel=OUTPUT
    )
    core_metric_every: int | None = option(
        None, help=f"CORE metric every N steps and at the end, from a local eval bundle ({CORE_EVERY.rule}).",
        unit="steps", panel=OUTPUT,
    )
    core_metric_max_per_task: int = option(500, help="CORE examples per task during training (-1 = all).", panel=OUTPUT)
    model_tag: str | None = option(None, help="Checkpoint tag (unset: d<depth>).", panel=OUTPUT)


# nanochat HEAD's values (used on CUDA) and the tiny CPU config, as typed presets (see apply_preset).
GPU_PRESET = PretrainOptions(
    depth=20, max_seq_len=2048, head_dim=128, window_pattern="SSSL", device_batch_size=32,
    total_batch_size=-1, num_iterations=-1, warmup_steps=40, eval_every=250, eval_tokens=80 * 524288,
    sample_every=2000, core_metric_every=2000,
)
CPU_PRESET = PretrainOptions(
    depth=4, max_seq_len=256, head_dim=64,
    window_pattern="L",  # sliding windows only pay off with FA3 on GPU
    device_batch_size=4,
    total_batch_size=0,  # = device batch x seq x processes: no grad accumulation
    num_iterations=200,  # ~1 s/step at vocab 32768 on 2 cores: a few minutes
    warmup_steps=10, eval_every=50, eval_tokens=8 * 1024,
    sample_every=-1,  # only at the end
    core_metric_every=-1,  # never: CORE takes minutes on a CPU, run `nanoctl eval base` instead
    lr_scale=LR_SCALE_CPU,
)
PRESETS = {"CUDA": GPU_PRESET, "CPU": CPU_PRESET}
# nanoDeepSeek's scales (reference §C.1): layers/width/heads 6/384/4, 12/768/6, 24/1536/12 with 8/16/32
# experts, top-2/4/6. Its n_kv_head (4/6/6) has no meaning under MLA, whose K/V are one shared latent.
DEEPSEEK_SCALES = {
    "small": PretrainOptions(depth=6, head_dim=96, experts=8, top_k=2),
    "base": PretrainOptions(depth=12, head_dim=128, experts=16, top_k=4),
    "large": PretrainOptions(depth=24, head_dim=128, experts=32, top_k=6),
}
DEEPSEEK_FLAGS = ("scale", "experts", "top_k", "shared_experts", "kv_lora_rank", "mtp_depth")


def _apply_scale(opts: PretrainOptions) -> PretrainOptions:
    """--scale's preset under the user's own flags; the deepseek flags refused for a dense arch."""
    if opts.arch != "deepseek":
        given = [f"--{name.replace('_', '-')}" for name in DEEPSEEK_FLAGS if getattr(opts, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to --arch deepseek (got --arch {opts.arch})",
                             "add --arch deepseek, or drop them")
        return opts
    if opts.scale is None:
        return opts
    if opts.scale not in DEEPSEEK_SCALES:
        raise UsageError(f"--scale {opts.scale!r} is unknown", f"use one of: {', '.join(DEEPSEEK_SCALES)}")
    return apply_preset(opts, DEEPSEEK_SCALES[opts.scale])  # widths = depth x the default aspect ratio 64


def deepseek_fields(o: PretrainOptions) -> dict[str, Any]:
    """The GPTConfig fields the deepseek flags set (none for a dense arch; unset = the config's default)."""
    if o.arch != "deepseek":
        return {}
    pairs = (("n_experts", o.experts), ("top_k", o.top_k), ("n_shared_experts", o.shared_experts),
             ("kv_lora_rank", o.kv_lora_rank), ("mtp_depth", o.mtp_depth))
    return {k: v for k, v in pairs if v is not None}


def resolve_options(opts: PretrainOptions, device_type: str) -> tuple[PretrainOptions, str]:
    """The options with the device preset applied, and the preset's name."""
    preset = "gpu" if device_type == "cuda" else "cpu"
    opts = _apply_scale(opts)
    if preset == "cpu" and opts.num_iterations is None and opts.target_flops > 0:
        from dataclasses import replace

        opts = replace(opts, num_iterations=-1)  # an explicit FLOPs horizon wins over the preset's steps
    return apply_preset(opts, GPU_PRESET if preset == "gpu" else CPU_PRESET), preset


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
        p, c = self.params, self.model_config
        core = f" CORE {CORE_EVERY.describe(self.core_metric_every)}"
        core += " (run `nanoctl eval base` after training)" if core.endswith("never") else ""
        return [
            f"preset: {self.preset} defaults" + (" (no CUDA: tiny config for a CPU run)" if self.preset == "cpu" else ""),
            f"model: depth {self.depth}, width {c['n_embd']}, heads {c['n_head']} (head dim {c['n_embd'] // c['n_head']}),"
            f" seq {self.max_seq_len}, window {c['window_pattern']}, arch {c['arch']}, vocab {self.vocab_size}",
            "params: " + ", ".join(f"{k} {v:,}" for k, v in p.items()),
            f"FLOPs/token: {self.flops_per_token:.3e}",
            f"batch: {self.total_batch_size:,} tokens/step = {self.device_batch_size} rows x {self.max_seq_len} tokens"
            f" x {self.world_size} process(es) x {self.grad_accum_steps} grad accum step(s)",
            f"LR scale {self.batch_lr_scale:.4f}; LRs: " + ", ".join(f"{k} {v:.5g}" for k, v in self.lrs.items()),
            f"Muon weight decay (scaled): {self.weight_decay:.5g}",
            f"horizon ({self.horizon_source}): {self.num_iterations:,} iterations, {self.total_tokens:,} tokens,"
            f" tokens:params {self.tokens_per_param:.2f}, total FLOPs {self.total_flops:.3e}",
            f"schedule: warmup {self.warmup_steps} steps; val bpb {EVERY.describe(self.eval_every)}"
            f" ({self.eval_tokens:,} tokens); samples {EVERY_AFTER_START.describe(self.sample_every)};" + core,
            *self.notes,
        ]


def _meta_model(config: Any) -> Any:
    import torch

    from nanoctl.model.gpt import GPT

    with torch.device("meta"):
        return GPT(config, dtype=torch.float32)


def _horizon(o: PretrainOptions, from_cpu_preset: bool, flops_per_token: float, total: int,
             target_tokens: int) -> tuple[int, str]:
    """Iterations and what set them: --num-iterations > --target-flops > --target-param-data-ratio."""
    ratio = o.target_param_data_ratio
    if o.num_iterations is not None and o.num_iterations > 0:
        return o.num_iterations, "--num-iterations" + (" (CPU preset)" if from_cpu_preset else "")
    if o.target_flops > 0:
        return round(o.target_flops / (flops_per_token * total)), "--target-flops"
    if ratio > 0:
        return target_tokens // total, f"--target-param-data-ratio {ratio:g}"
    raise UsageError("no training horizon", "give --num-iterations, --target-flops or --target-param-data-ratio > 0")


def plan_pretrain(opts: PretrainOptions, vocab_size: int, device_type: str, world_size: int = 1) -> PretrainPlan:
    """nanochat HEAD's scaling rules (see reference §3 "Scaling with batch/horizon")."""
    from nanoctl.model.gpt import config_for_depth

    o, preset = resolve_options(opts, device_type)
    for name, val in (("--depth", o.depth), ("--max-seq-len", o.max_seq_len), ("--device-batch-size", o.device_batch_size)):
        if val < 1:
            raise UsageError(f"{name} must be >= 1, got {val}")
    shape = (vocab_size, o.max_seq_len, o.aspect_ratio, o.head_dim, o.window_pattern, o.arch)
    variant = deepseek_fields(o)
    config = config_for_depth(o.depth, *shape, **variant)
    model = _meta_model(config)
    params = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    scaling = params["scaling"]  # matrices + lm_head (MoE: the active ones)
    ref = _meta_model(config_for_depth(REF_DEPTH, *shape, **variant)).num_scaling_params()
    ratio = o.target_param_data_ratio
    target_tokens = int(ratio * scaling)
    d_ref = ratio * ref["scaling"]
    notes = []
    if o.arch == "deepseek":
        from nanoctl.model.deepseek import describe

        notes.append(describe(config))
    notes.append(f"KV cache: {model.kv_bytes_per_token(2):,} bytes/token in bf16 ({model.kv_bytes_per_token(4):,} in fp32)")

    B, T = o.device_batch_size, o.max_seq_len
    per_step = B * T * world_size
    total = o.total_batch_size
    if total == 0:  # one micro-batch per process, no grad accumulation
        total = per_step
    if total == -1:
        total = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** BATCH_EXPONENT))
    if total % per_step:
        raise UsageError(
            f"--total-batch-size {total:,} is not a multiple of --device-batch-size x --max-seq-len x processes"
            f" = {B} x {T} x {world_size} = {per_step:,}",
            f"use --total-batch-size {max(1, round(total / per_step)) * per_step} or change --device-batch-size",
        )
    batch_lr_scale = o.lr_scale if o.lr_scale is not None else math.sqrt(total / B_REF)
    from_cpu_preset = preset == "cpu" and opts.num_iterations is None
    iters, source = _horizon(o, from_cpu_preset, flops_per_token, total, target_tokens)
    if iters < 1:
        raise UsageError(f"the horizon gives {iters} iterations", "raise --num-iterations / --target-flops / ratio")
    lrs = {k: getattr(o, f"{k}_lr") * batch_lr_scale for k in ("embedding", "unembedding", "matrix", "scalar")}
    return PretrainPlan(
        preset=preset, depth=o.depth, model_tag=o.model_tag or f"d{o.depth}", model_config=config.to_dict(),
        params=params, flops_per_token=flops_per_token, max_seq_len=T, device_batch_size=B,
        total_batch_size=total, world_size=world_size, grad_accum_steps=total // per_step,
        num_iterations=iters, horizon_source=source, target_tokens=target_tokens, total_tokens=iters * total,
        tokens_per_param=iters * total / scaling, total_flops=flops_per_token * iters * total,
        batch_lr_scale=batch_lr_scale,
        weight_decay=o.weight_decay * math.sqrt(total / B_REF) * (d_ref / target_tokens), lrs=lrs,
        warmup_steps=o.warmup_steps, eval_every=o.eval_every, eval_tokens=o.eval_tokens,
        sample_every=o.sample_every, core_metric_every=o.core_metric_every, vocab_size=vocab_size, notes=notes,
    )


def greedy_samples(model: Any, tokenizer: Any, max_tokens: int = 16) -> list[str]:
    """Greedy continuations of nanochat's sample prompts (rank 0 only; the uncompiled model)."""
    import torch

    from nanoctl.evaluate.base import SAMPLE_PROMPTS

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = []
            for prompt in SAMPLE_PROMPTS:
                ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                out.append(prompt + tokenizer.decode(list(model.generate(ids, max_tokens=max_tokens, temperature=0.0))))
            return out
    finally:
        model.train(was_training)


class Pretrain(Stage):
    name, command = "base", "pretrain"
    every_flags = {"eval_every": EVERY, "sample_every": EVERY_AFTER_START, "core_metric_every": CORE_EVERY}

    def __init__(self, opts: PretrainOptions, home: Any, device: Any, world_size: int) -> None:
        super().__init__(opts, home, device, world_size)
        self.val_bpb: float | None = None
        self.min_val_bpb = float("inf")
        self.core_metric: float | None = None
        self.core_bundle: Any = None
        self.core_skipped = False

    def _vocab(self) -> tuple[int, str | None]:
        """The tokenizer's vocabulary; --dry-run alone goes on without a tokenizer, assuming a size."""
        from nanoctl.tokenizer import load_tokenizer

        try:
            return load_tokenizer(self.home).get_vocab_size(), None
        except NanoctlError as e:
            if not self.opts.dry_run:
                raise
            return DEFAULT_VOCAB, f"note: {e.message}; the plan assumes vocab {DEFAULT_VOCAB}"

    def plan(self) -> Plan:
        vocab, note = self._vocab()
        p = plan_pretrain(self.opts, vocab, self.device.type, self.world_size)
        self.o = resolve_options(self.opts, self.device.type)[0]
        if note:
            p.notes.append(note)
        self.p = p
        meta = dict(device_batch_size=p.device_batch_size, max_seq_len=p.max_seq_len, total_batch_size=p.total_batch_size)
        return Plan(p.model_tag, p.num_iterations, p.lines(), p.resume_keys(), meta, None, p.max_seq_len,
                    details=p.__dict__)

    def report_dir(self, tag: str) -> Any:
        return self.home.report_dir(tag)

    def optimizer_settings(self) -> tuple[dict[str, float], float, float]:
        return self.p.lrs, self.p.weight_decay, 1.0

    def load_model(self, run: Run) -> tuple[Any, Any]:
        from nanoctl.model.gpt import GPTConfig, build_model
        from nanoctl.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.home)
        return build_model(GPTConfig.from_dict(self.p.model_config), device=run.device, dtype=run.dtype), tokenizer

    def start(self, run: Run, saved: dict[str, Any], loader_state: dict[str, Any] | None) -> None:
        from nanoctl import dist
        from nanoctl.atomic import atomic_write_json
        from nanoctl.data.loader import DataLoader
        from nanoctl.data.shards import resolve_pretrain_shards
        from nanoctl.options import jsonable, user_config
        from nanoctl.tokenizer import load_token_bytes

        loop = saved.get("loop_state") or {}
        self.val_bpb = loop.get("val_bpb")
        self.min_val_bpb = loop.get("min_val_bpb") or float("inf")
        self.core_metric = loop.get("core_metric")
        # rank 0 materializes the embedded sample if needed, the others wait and reuse it
        if run.master:
            self.shards = resolve_pretrain_shards(self.home)
        dist.barrier()
        if not run.master:
            self.shards = resolve_pretrain_shards(self.home)
        if len(self.shards.paths) < 2:
            raise NanoctlError(f"pretraining needs >= 2 shards (train + val) in {self.shards.directory}",
                               "run `nanoctl data download`")
        run.print(f"data: {len(self.shards.train_paths)} train shard(s) + 1 val shard in {self.shards.directory}"
                  + (" (using embedded sample; run `nanoctl data download` for real data)" if self.shards.is_sample else ""))
        self.token_bytes = load_token_bytes(self.home, device=run.device)
        B, T, info = self.p.device_batch_size, self.p.max_seq_len, run.info
        self.loader = DataLoader(run.tokenizer, self.shards.train_paths, B, T, rank=info.rank,
                                 world_size=info.world_size, device=run.device, state=loader_state)
        if run.master:
            atomic_write_json(self.report_dir(self.p.model_tag) / "pretrain_config.json",
                              {"options": user_config(self.opts), "plan": jsonable(self.p.__dict__)})

    def loader_state(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def close(self) -> None:
        self.loader.close()

    def step(self, run: Run, step: int) -> StepStats:
        import torch

        loss_sum = torch.zeros((), device=run.device, dtype=torch.float32)
        accum = self.p.grad_accum_steps
        for _ in range(accum):
            x, y = next(self.loader)
            loss = run.train_model(x, y)
            loss_sum += loss.detach().float()
            run.backward(loss / accum)
        epoch = self.loader.state_dict()["epoch"]
        return StepStats(loss_sum / accum, self.p.total_batch_size, {"epoch": epoch}, f"epoch {epoch}")

    def schedule(self, step: int, num_steps: int) -> tuple[float, float | None, float | None]:
        from nanoctl.train.schedules import lr_multiplier, muon_momentum, muon_weight_decay

        o, p = self.opts, self.p
        return (lr_multiplier(step, num_steps, p.warmup_steps, o.warmdown_ratio, o.final_lr_frac),
                muon_momentum(step, num_steps, o.warmdown_ratio), muon_weight_decay(step, num_steps, p.weight_decay))

    def evaluate(self, run: Run, step: int, last: bool) -> dict[str, Any]:
        from nanoctl.data.loader import val_loader
        from nanoctl.evaluate.bpb import evaluate_bpb

        p, out = self.p, {}
        if self.due("eval_every", step, last):
            B, T, info = p.device_batch_size, p.max_seq_len, run.info
            run.train_model.eval()
            with val_loader(run.tokenizer, self.shards.val_path, B, T, rank=info.rank,
                            world_size=info.world_size, device=run.device) as vl:
                self.val_bpb = evaluate_bpb(run.model, vl, max(1, p.eval_tokens // (B * T * info.world_size)),
                                            self.token_bytes)
            run.train_model.train()
            self.min_val_bpb = min(self.min_val_bpb, self.val_bpb)
            run.print(f"step {step:05d} | validation bpb: {self.val_bpb:.6f}")
            out["val_bpb"] = self.val_bpb
        if self.due("core_metric_every", step, last):
            core = self._core(run)
            if core is not None:
                self.core_metric = out["core_metric"] = core
                run.print(f"step {step:05d} | CORE metric: {core:.4f}")
        if run.master and self.due("sample_every", step, last):
            for text in greedy_samples(run.model, run.tokenizer):
                run.print(f"  sample: {text!r}")
        return out

    def _core(self, run: Run) -> float | None:
        """CORE on the uncompiled model (nanochat's --core-metric-every); None when no bundle is local."""
        from nanoctl.evaluate.core import evaluate_core, resolve_bundle

        if self.core_skipped:
            return None
        if self.core_bundle is None:
            try:  # never downloads mid-run: a missing bundle skips CORE with a note instead
                self.core_bundle = resolve_bundle(home=self.home, download=False)
            except NanoctlError as e:
                self.core_skipped = True
                run.print(f"CORE during training skipped: {e.message} (`nanoctl eval base` downloads it)")
                return None
        run.train_model.eval()
        result = evaluate_core(run.model, run.tokenizer, run.device, self.core_bundle,
                               max_per_task=self.opts.core_metric_max_per_task)
        run.train_model.train()
        return result.core

    def loop_state(self) -> dict[str, Any]:
        mv = None if not math.isfinite(self.min_val_bpb) else self.min_val_bpb
        out = {"val_bpb": self.val_bpb, "min_val_bpb": mv}
        return out | ({"core_metric": self.core_metric} if self.core_metric is not None else {})

    def state(self) -> dict[str, Any]:
        return {"val_bpb": self.val_bpb} | ({"core_metric": self.core_metric} if self.core_metric is not None else {})

    def done_line(self, run: Run) -> str:
        from nanoctl.train.progress import format_duration

        return (f"done: {self.p.num_iterations} steps; training time {format_duration(run.loop.total_training_time)}"
                + (f"; min val bpb {self.min_val_bpb:.4f}" if math.isfinite(self.min_val_bpb) else "")
                + f"; checkpoint {run.directory}")

    def result(self, run: Run) -> dict[str, Any]:
        metrics = self.loop_state()
        return {"val_loss": self.val_bpb, "metrics": {k: v for k, v in metrics.items() if v is not None}}


def pretrain(opts: PretrainOptions, home: Any = None) -> StageResult:
    """Train a base model; see the module docstring. Raises NanoctlError/UsageError/Interrupted."""
    return run_stage(Pretrain, opts, home)

