"""`nanoctl eval base`: CORE + train/val bits-per-byte + samples for a checkpoint (nanochat HEAD base_eval).

Works on any stage's checkpoint (default: the newest base). Rank 0 writes the record; under torchrun
CORE examples and bpb batches are split across ranks and summed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoctl.errors import UsageError
from nanoctl.home import Home

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
    stage: str = "base"
    tag: str | None = None
    step: int | None = None
    checkpoint: str | None = None  # a checkpoint directory instead of stage/tag/step
    evals: Sequence[str] = BASE_EVALS
    max_per_task: int = -1
    core_tasks: Sequence[str] | None = None  # restrict CORE to these labels
    bundle: str | None = None
    download: bool = True
    device_batch_size: int = 32
    split_tokens: int = 40 * 524288
    sample_tokens: int = 16
    unconditioned_samples: int = 8
    unconditioned_tokens: int = 128
    device: str = "auto"
    dtype: str | None = None
    write: bool = True
    progress: bool = True


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

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "record"} | {"record": self.record}


def _validate(opts: BaseEvalOptions) -> None:
    bad = [e for e in opts.evals if e not in BASE_EVALS]
    if bad or not opts.evals:
        raise UsageError(
            f"--eval {','.join(bad) or '(empty)'}: unknown", f"choose from {', '.join(BASE_EVALS)}"
        )
    if opts.device_batch_size < 1:
        raise UsageError(f"--device-batch-size {opts.device_batch_size} must be >= 1")
    if opts.split_tokens < 1:
        raise UsageError(f"--split-tokens {opts.split_tokens} must be >= 1")
    if opts.max_per_task == 0 or opts.max_per_task < -1:
        raise UsageError(f"--max-per-task {opts.max_per_task} must be a positive count (or -1 for all)")


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

    An entry point: `home` is resolved here.
    """
    _validate(opts)
    home = Home.resolve(home)
    import torch

    from nanoctl import dist
    from nanoctl.checkpoint import find_checkpoint, load_model, resolve_checkpoint_path
    from nanoctl.device import compute_dtype, parse_dtype
    from nanoctl.evaluate.progress import EvalProgress
    from nanoctl.evaluate.results import EvalRecord, hardware_info, model_summary, write_record

    t0 = time.perf_counter()
    # Resolve the bundle before loading the model: a missing bundle fails fast and cheaply.
    bundle_dir = None
    if "core" in opts.evals:
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
    master = info.is_master
    ref = (
        resolve_checkpoint_path(opts.checkpoint, opts.step)
        if opts.checkpoint
        else find_checkpoint(opts.stage, opts.tag, opts.step, home=home)
    )
    dtype = parse_dtype(opts.dtype) if opts.dtype else compute_dtype(info.device)
    model, tokenizer, meta = load_model(ref, device=info.device, dtype=dtype, home=home)
    model.eval()
    progress = EvalProgress(enabled=opts.progress and master)
    result = BaseEvalResult(stage=ref.stage, tag=ref.tag, step=ref.step)
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
                    max_per_task=opts.max_per_task,
                    batch_rows=opts.device_batch_size,
                    tasks=opts.core_tasks,
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
                bpb, tokens = evaluate_split_bpb(
                    model,
                    tokenizer,
                    token_bytes,
                    paths,
                    opts.device_batch_size,
                    opts.split_tokens,
                    info.rank,
                    info.world_size,
                )
                result.bpb[split] = bpb
                progress.finish(
                    f"{split} bpb: {bpb:.4f} ({tokens:,} tokens{', sample corpus' if shards.is_sample else ''})"
                )
        if "sample" in opts.evals and master:
            with torch.no_grad():
                result.samples = sample_texts(model, tokenizer, opts)
    finally:
        progress.close()
    result.seconds = time.perf_counter() - t0
    record = EvalRecord(
        kind="base",
        stage=ref.stage,
        tag=ref.tag,
        step=ref.step,
        model=model_summary(meta),
        settings={
            "evals": list(opts.evals),
            "max_per_task": opts.max_per_task,
            "core_tasks": list(opts.core_tasks) if opts.core_tasks else None,
            "bundle": str(bundle_dir) if bundle_dir else None,
            "device_batch_size": opts.device_batch_size,
            "split_tokens": opts.split_tokens,
            "dtype": str(dtype).removeprefix("torch."),
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
