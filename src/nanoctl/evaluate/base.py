"""`nanoctl eval base`: CORE + train/val bits-per-byte + samples for a checkpoint (nanochat HEAD base_eval).

Works on any stage's checkpoint (default: the newest base). Rank 0 writes the record; under torchrun
CORE examples and bpb batches are split across ranks and summed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nanoctl.errors import UsageError
from nanoctl.home import Home
from nanoctl.inference_options import check_quantize, prepare_for_inference, quantize_option, record_name
from nanoctl.options import DATA, MODEL, OUTPUT, RUNTIME, apply_preset, option

BASE_EVALS = ("core", "bpb", "sample")
# nanochat base_eval's conditioned prompts (greedy, 16 tokens each).
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@dataclass
class BaseEvalOptions:
    """Options of `nanoctl eval base`. None = the device preset (CUDA: nanochat's values, else CPU_PRESET)."""

    stage: str = option("base", help="Checkpoint stage: base, mid, sft, rl.", panel=MODEL)
    tag: str | None = option(None, help="Checkpoint tag (unset: the largest d<N>).", panel=MODEL)
    step: int | None = option(None, help="Checkpoint step (unset: the latest).", panel=MODEL)
    checkpoint: str | None = option(None, help="Evaluate this checkpoint directory instead.", panel=MODEL)
    evals: list[str] = option(
        help="What to run: core, bpb, sample (repeatable or comma-separated).", flag="--eval", panel=OUTPUT,
        factory=lambda: list(BASE_EVALS),
    )
    max_per_task: int | None = option(None, help="CORE examples per task (-1 = all).", panel=OUTPUT)
    split_tokens: int | None = option(
        None, help="Tokens per split (train, val) for bits per byte, rounded down to whole batches.",
        unit="tokens", panel=OUTPUT,
    )
    core_tasks: list[str] = option(
        help="Only this CORE task label (repeatable; unset: every task in the bundle).", flag="--core-task",
        panel=OUTPUT, factory=list,
    )
    bundle: str | None = option(
        None, help="CORE eval bundle directory (unset: <home>/eval/bundle, downloaded once).", panel=DATA
    )
    download: bool = option(True, help="Download the CORE bundle when the home has none.", panel=DATA)
    device_batch_size: int | None = option(
        None, help="Rows per forward (bpb batch rows; CORE rows per batch).", panel=RUNTIME
    )
    device: str = option("auto", help="auto, cpu, cuda, cuda:N or mps.")
    dtype: str | None = option(
        None, help="Compute dtype: bfloat16, float16 or float32 (unset: bf16 on CUDA SM80+, else fp32)."
    )
    lora: str | None = option(
        None, help="Mount this LoRA adapter directory (base: the adapter's own unless --checkpoint/--tag/--step);"
        " writes eval_base_<stage>-lora_*.", panel=MODEL,
    )
    quantize: str = quantize_option()  # int8: records as <stage>-int8 beside the fp32 results
    progress: bool = option(True, help="Show progress (--no-progress: results only).")
    dry_run: bool = option(
        False, help="Print what would be evaluated and a time estimate (measured on a few batches), then exit."
    )
    sample_tokens: int = option(16, help="Tokens per greedy sample.", cli=False)
    unconditioned_samples: int = option(8, help="Unconditioned samples (BOS only, T=1.0).", cli=False)
    unconditioned_tokens: int = option(128, help="Tokens per unconditioned sample.", cli=False)
    write: bool = option(True, help="Write reports/<tag>/eval_base_*.", cli=False)


# nanochat's base_eval defaults on CUDA; on a CPU (or MPS) a budget that finishes in minutes for a small
# model: `--dry-run` measures the estimate for the model at hand.
GPU_PRESET = BaseEvalOptions(max_per_task=-1, split_tokens=40 * 524288, device_batch_size=32)
CPU_PRESET = BaseEvalOptions(max_per_task=8, split_tokens=8192, device_batch_size=8)
PRESETS = {"CUDA": GPU_PRESET, "CPU": CPU_PRESET}


def resolve_options(opts: BaseEvalOptions, device_type: str) -> tuple[BaseEvalOptions, str]:
    """The options with the device preset applied (and --eval split at commas), and the preset's name."""
    preset = "gpu" if device_type == "cuda" else "cpu"
    evals = [e.strip() for item in opts.evals for e in str(item).split(",") if e.strip()]
    opts = replace(opts, evals=evals, core_tasks=list(opts.core_tasks or []))
    return apply_preset(opts, GPU_PRESET if preset == "gpu" else CPU_PRESET), preset


@dataclass
class BaseEvalResult:
    stage: str
    tag: str
    step: int
    core: dict[str, Any] | None = None
    bpb: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    json_path: str | None = None
    markdown_path: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    plan: dict[str, Any] = field(default_factory=dict)  # what was (or would be) evaluated, + the estimate

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "record"} | {"record": self.record}


def _validate_evals(opts: BaseEvalOptions) -> None:
    check_quantize(opts.quantize, opts.device, opts.dtype)
    evals = [e.strip() for item in opts.evals for e in str(item).split(",") if e.strip()]
    bad = [e for e in evals if e not in BASE_EVALS]
    if bad or not evals:
        raise UsageError(
            f"--eval {','.join(bad) or '(empty)'}: unknown", f"choose from {', '.join(BASE_EVALS)}"
        )


def _validate(opts: BaseEvalOptions) -> None:
    """The options after the preset: every budget is set and positive."""
    if opts.device_batch_size < 1:  # type: ignore[operator]
        raise UsageError(f"--device-batch-size {opts.device_batch_size} must be >= 1")
    if opts.split_tokens < 1:  # type: ignore[operator]
        raise UsageError(f"--split-tokens {opts.split_tokens} must be >= 1")
    if opts.max_per_task == 0 or opts.max_per_task < -1:  # type: ignore[operator]
        raise UsageError(f"--max-per-task {opts.max_per_task} must be a positive count (or -1 for all)")


@dataclass
class BaseEvalPlan:
    """What `eval base` evaluates (before any forward); `estimate` is filled by --dry-run's measurement."""

    preset: str  # "cpu" | "gpu"
    checkpoint: str  # stage/tag@step
    model: str  # depth, params, context, device, dtype
    evals: list[str]
    max_per_task: int
    core_tasks: list[dict[str, Any]]  # label, examples
    core_missing: list[str]
    core_total_tasks: int
    bundle: str | None
    split_tokens: dict[str, int]  # tokens actually evaluated per split
    bpb_batches: int  # per split
    batch: str  # rows x context x processes
    samples: dict[str, int]
    estimate: dict[str, float] = field(default_factory=dict)  # seconds by part, "total"

    def lines(self) -> list[str]:
        cpu = " (no CUDA: a budget that finishes in minutes; set --max-per-task/--split-tokens for more)"
        lines = [
            f"preset: {self.preset} defaults" + (cpu if self.preset == "cpu" else ""),
            f"model: {self.checkpoint}, {self.model}",
        ]
        if "core" in self.evals:
            n = sum(t["examples"] for t in self.core_tasks)
            cap = "all examples" if self.max_per_task < 0 else f"<= {self.max_per_task} examples"
            missing = f"; missing task files: {', '.join(self.core_missing)}" if self.core_missing else ""
            lines.append(
                f"CORE: {len(self.core_tasks)} of {self.core_total_tasks} tasks x {cap} = {n:,} examples"
                f" from {self.bundle}{missing}"
            )
            fewer = sorted({(t["shots"], t["shots_used"]) for t in self.core_tasks if t["shots_used"] < t["shots"]})
            if fewer:
                lines.append(
                    "  few-shot: " + ", ".join(f"{a}-shot tasks get {b} shots" for a, b in fewer)
                    + " (shots come from the capped items; --max-per-task 11 or more gives every shot)"
                )
        if "bpb" in self.evals:
            tokens = ", ".join(f"{k} {v:,}" for k, v in self.split_tokens.items())
            lines.append(f"bpb: {tokens} tokens ({self.bpb_batches} batch(es) of {self.batch} per split)")
        if "sample" in self.evals:
            s = self.samples
            lines.append(
                f"samples: {s['greedy']} greedy x {s['greedy_tokens']} tokens"
                + (f" + {s['unconditioned']} unconditioned x {s['unconditioned_tokens']} tokens"
                   if s["unconditioned"] else "")
            )
        if self.estimate:
            e = self.estimate
            parts = ", ".join(f"{k} {duration(v)}" for k, v in e.items() if k != "total")
            lines.append(f"estimate: {duration(e['total'])} ({parts}), measured on a few batches here")
        return lines


def duration(seconds: float) -> str:
    """4.2s, 1m05s, 2h03m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def plan_eval(
    opts: BaseEvalOptions, preset: str, ref: Any, model: Any, dtype: Any, bundle_dir: Path | None, world: int,
) -> BaseEvalPlan:
    """The plan for options with the preset applied, a loaded model and the resolved bundle."""
    from nanoctl.evaluate.core import count_examples, select_tasks

    cfg = model.config
    T, B = int(cfg.sequence_len), int(opts.device_batch_size)  # type: ignore[arg-type]
    core_tasks: list[dict[str, Any]] = []
    missing: list[str] = []
    total_tasks = 0
    if "core" in opts.evals and bundle_dir is not None:
        tasks = select_tasks(bundle_dir, opts.core_tasks)
        total_tasks = len(tasks)
        for t in tasks:
            if t.present:
                n = count_examples(t, opts.max_per_task)  # type: ignore[arg-type]
                # the shots are drawn from the (capped) items themselves, as nanochat: at most n - 1
                core_tasks.append({"label": t.label, "examples": n, "shots": t.num_fewshot,
                                   "shots_used": min(t.num_fewshot, n - 1)})
            else:
                missing.append(t.label)
    batches = max(1, opts.split_tokens // (B * T * world))  # type: ignore[operator]
    params = sum(p.numel() for p in model.parameters())
    greedy = len(SAMPLE_PROMPTS)
    return BaseEvalPlan(
        preset=preset,
        checkpoint=f"{ref.stage}/{ref.tag}@{ref.step}",
        model=f"depth {cfg.n_layer}, {params / 1e6:.1f}M params, context {T}, vocab {cfg.vocab_size},"
        f" on {model.get_device()} in {str(dtype).removeprefix('torch.')}",
        evals=list(opts.evals),
        max_per_task=int(opts.max_per_task),  # type: ignore[arg-type]
        core_tasks=core_tasks,
        core_missing=missing,
        core_total_tasks=total_tasks,
        bundle=str(bundle_dir) if bundle_dir else None,
        split_tokens={"train": batches * B * T * world, "val": batches * B * T * world},
        bpb_batches=batches,
        batch=f"{B} x {T}" + (f" x {world} processes" if world > 1 else ""),
        samples={"greedy": greedy, "greedy_tokens": opts.sample_tokens,
                 "unconditioned": max(0, opts.unconditioned_samples),
                 "unconditioned_tokens": opts.unconditioned_tokens},
    )


def estimate_eval(plan: BaseEvalPlan, opts: BaseEvalOptions, model: Any, tokenizer: Any, device: Any,
                  bundle_dir: Path | None, world: int, load_seconds: float) -> dict[str, float]:
    """Seconds by part (load, CORE, bpb, samples) and in total, measured on slices of the real work."""
    from nanoctl.evaluate import estimate

    out = {"load": load_seconds}
    if "core" in plan.evals and bundle_dir is not None:
        from nanoctl.evaluate.core import select_tasks

        tasks = select_tasks(bundle_dir, opts.core_tasks)
        seconds, _ = estimate.time_core(model, tokenizer, device, tasks, plan.max_per_task,
                                        int(opts.device_batch_size))  # type: ignore[arg-type]
        out["CORE"] = seconds / world
    if "bpb" in plan.evals:
        T = int(model.config.sequence_len)
        one = estimate.time_bpb(model, tokenizer.get_vocab_size(), int(opts.device_batch_size), T,  # type: ignore[arg-type]
                                plan.bpb_batches, device)
        out["bpb"] = 2 * one  # train + val; each rank runs its own batches in parallel
    if "sample" in plan.evals:
        out["samples"] = estimate.time_samples(model, tokenizer, SAMPLE_PROMPTS, opts.sample_tokens,
                                               opts.unconditioned_samples, opts.unconditioned_tokens)
    out["total"] = sum(out.values())
    return out


def load_token_bytes_for(ref_dir: Path, home: Home, device: Any) -> Any:
    """token_bytes saved next to the checkpoint (exact match with its tokenizer), else the home's."""
    import torch

    local = Path(ref_dir) / "token_bytes.pt"
    if local.exists():
        return torch.load(local, map_location=device, weights_only=True)
    from nanoctl.tokenizer import load_token_bytes

    return load_token_bytes(home, device=device)


def evaluate_split_bpb(
    model: Any,
    tokenizer: Any,
    token_bytes: Any,
    paths: Sequence[Path],
    B: int,
    split_tokens: int,
    rank: int,
    world: int,
) -> tuple[float, int]:
    """bpb over ~split_tokens tokens (rounded down to whole B x T x world batches, at least one)."""
    from nanoctl.data.loader import DataLoader
    from nanoctl.evaluate.bpb import evaluate_bpb

    T = model.config.sequence_len
    steps = max(1, split_tokens // (B * T * world))
    device = model.get_device()
    with DataLoader(tokenizer, list(paths), B, T, rank=rank, world_size=world, device=device) as loader:
        return evaluate_bpb(model, loader, steps, token_bytes), steps * B * T * world


def sample_texts(model: Any, tokenizer: Any, opts: BaseEvalOptions) -> list[str]:
    """Greedy continuations of nanochat's prompts, then unconditioned samples (BOS only, T=1.0)."""
    from nanoctl.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    out = []
    greedy = SamplingParams(temperature=0.0, max_tokens=opts.sample_tokens)
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=bos)
        rows, _ = engine.generate_batch(ids, greedy)
        out.append(tokenizer.decode(rows[0][1:]))
    if opts.unconditioned_samples > 0:
        # nanochat's base_eval: T=1.0 over the full vocabulary (no top-k), seed 42.
        unconditioned = SamplingParams(
            temperature=1.0, top_k=None, max_tokens=opts.unconditioned_tokens, seed=42
        )
        rows, _ = engine.generate_batch([bos], unconditioned, num_samples=opts.unconditioned_samples)
        out += [tokenizer.decode(r[1:]) for r in rows]
    return out


def eval_base(opts: BaseEvalOptions, *, home: Home | str | os.PathLike[str] | None = None) -> BaseEvalResult:
    """Load the checkpoint, run the requested evals, write `<home>/reports/<tag>/eval_base_*.{json,md}`.

    Options left at None take the device preset (CUDA: nanochat's; else CPU_PRESET). With `dry_run`, print
    the plan and a measured time estimate instead, and return them (`plan`). An entry point: `home` is
    resolved here.
    """
    _validate_evals(opts)
    home = Home.resolve(home)
    import torch

    from nanoctl import dist
    from nanoctl.checkpoint import load_model
    from nanoctl.device import compute_dtype, parse_dtype
    from nanoctl.evaluate.progress import EvalProgress
    from nanoctl.evaluate.results import EvalRecord, hardware_info, model_summary, write_record

    t0 = time.perf_counter()
    # Resolve the bundle before loading the model: a missing bundle fails fast and cheaply.
    bundle_dir = None
    if "core" in [e.strip() for item in opts.evals for e in str(item).split(",")]:
        from nanoctl.evaluate.core import BUNDLE_URL, resolve_bundle

        fetch = EvalProgress(enabled=opts.progress)

        def on_bytes(done: int, total: int) -> None:
            if not fetch.name:
                fetch.start(f"downloading {BUNDLE_URL}", max(total, 1))
            fetch.update(min(done, max(total, 1)), f"{done / 2**20:.1f} MiB")

        try:
            bundle_dir = resolve_bundle(opts.bundle, home=home, download=opts.download, progress=on_bytes)
        finally:
            fetch.close()
    info = dist.init_distributed(opts.device)
    opts, preset = resolve_options(opts, info.device.type)
    _validate(opts)
    master = info.is_master
    if opts.lora is not None:
        from nanoctl.adapters import check_adapter_path

        check_adapter_path(opts.lora)
    from nanoctl.adapters import resolve_base

    # --stage has a default here, so with --lora only --tag/--step/--checkpoint leave the adapter's own base
    own_base = opts.lora is not None and opts.tag is None and opts.step is None
    ref = resolve_base(opts.lora, None if own_base else opts.stage, opts.tag, opts.step, opts.checkpoint, home)
    dtype = parse_dtype(opts.dtype) if opts.dtype else compute_dtype(info.device)
    check_quantize(opts.quantize, info.device, dtype)
    model, tokenizer, meta = load_model(ref, device=info.device, dtype=dtype, home=home)
    model.eval()
    plan = plan_eval(opts, preset, ref, model, dtype, bundle_dir, info.world_size)
    # after the plan: it counts the checkpoint's own parameters
    lora = prepare_for_inference(model, opts.lora, opts.quantize)
    if lora is not None:
        meta["lora"] = lora
    stage, step = record_name(ref.stage, ref.step, lora, opts.quantize)  # eval_base_sft-lora_*, ...-int8_*
    result = BaseEvalResult(stage=stage, tag=ref.tag, step=step, dry_run=opts.dry_run)
    if opts.dry_run:
        plan.estimate = estimate_eval(plan, opts, model, tokenizer, info.device, bundle_dir, info.world_size,
                                      time.perf_counter() - t0)
        for line in plan.lines():
            _say(line, master)
        result.plan = plan.__dict__ | {"lines": plan.lines()}
        result.seconds = time.perf_counter() - t0
        return result
    if opts.progress:
        for line in plan.lines():
            _say(line, master)
    result.plan = plan.__dict__ | {"lines": plan.lines()}
    progress = EvalProgress(enabled=opts.progress and master)
    try:
        if "core" in opts.evals:
            from nanoctl.evaluate.core import evaluate_core

            def on_progress(label: str, done: int, total: int) -> None:
                if progress.name != label:
                    progress.start(label, total)
                progress.update(done)

            def on_task(r: Any) -> None:
                progress.finish(
                    f"{r.label:<34} acc {r.accuracy:.4f} | centered {r.centered:+.4f} | {r.seconds:.1f}s"
                )

            with torch.no_grad():
                core = evaluate_core(
                    model,
                    tokenizer,
                    info.device,
                    bundle_dir,  # type: ignore[arg-type]
                    max_per_task=opts.max_per_task,  # type: ignore[arg-type]
                    batch_rows=opts.device_batch_size,  # type: ignore[arg-type]
                    tasks=opts.core_tasks or None,
                    progress=on_progress,
                    on_task=on_task,
                )
            result.core = core.to_dict()
            if core.missing:
                progress.finish(f"missing task files (excluded): {', '.join(core.missing)}")
            if core.core is not None:
                progress.finish(f"CORE: {core.core:.4f} over {len(core.tasks)} of {core.total_tasks} tasks")
        if "bpb" in opts.evals:
            from nanoctl.data.shards import resolve_pretrain_shards

            shards = resolve_pretrain_shards(home)
            token_bytes = load_token_bytes_for(ref.directory, home, info.device)
            for split, paths in (("train", shards.train_paths), ("val", [shards.val_path])):
                progress.start(f"bpb {split}", 1)
                t_split = time.perf_counter()
                bpb, tokens = evaluate_split_bpb(
                    model,
                    tokenizer,
                    token_bytes,
                    paths,
                    opts.device_batch_size,  # type: ignore[arg-type]
                    opts.split_tokens,  # type: ignore[arg-type]
                    info.rank,
                    info.world_size,
                )
                result.bpb[split] = bpb
                sample = ", sample corpus" if shards.is_sample else ""
                progress.finish(
                    f"{split} bpb: {bpb:.4f} ({tokens:,} tokens{sample}) | {time.perf_counter() - t_split:.1f}s"
                )
        if "sample" in opts.evals and master:
            t_samples = time.perf_counter()
            with torch.no_grad():
                result.samples = sample_texts(model, tokenizer, opts)
            progress.finish(f"samples: {len(result.samples)} | {time.perf_counter() - t_samples:.1f}s")
    finally:
        progress.close()
    result.seconds = time.perf_counter() - t0
    record = EvalRecord(
        kind="base",
        stage=stage,
        tag=ref.tag,
        step=step,
        model=model_summary(meta) | ({"lora": meta["lora"]} if "lora" in meta else {}),
        settings={
            "evals": list(opts.evals),
            "preset": preset,
            "max_per_task": opts.max_per_task,
            "core_tasks": list(opts.core_tasks) or None,
            "bundle": str(bundle_dir) if bundle_dir else None,
            "device_batch_size": opts.device_batch_size,
            "split_tokens": opts.split_tokens,
            "dtype": str(dtype).removeprefix("torch."),
            "quantize": opts.quantize,
            "world_size": info.world_size,
        },
        results={"core": result.core, "bpb": result.bpb, "samples": result.samples},
        seconds=result.seconds,
        hardware=hardware_info(info.device),
    )
    if opts.write and master:
        j, m = write_record(record, home)
        result.json_path, result.markdown_path = str(j), str(m)
    result.record = record.to_dict()
    return result


def _say(line: str, master: bool) -> None:
    """Plan lines go to stderr (rank 0), so `--json` on stdout stays clean."""
    if master:
        print(line, file=sys.stderr, flush=True)
