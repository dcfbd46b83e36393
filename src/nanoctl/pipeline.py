"""`nanoctl run`: the whole pipeline, one stage after another, each skipped when its output exists.

text → tok train → pretrain → mid → sft → eval → report → a first chat reply. With no options it runs
tiny on the CPU on the embedded sample corpus and the bundled starter conversations, so a learner sees
every stage work end to end in minutes; `--stages` picks a subset and `--force` redoes them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanoctl.errors import UsageError
from nanoctl.home import Home
from nanoctl.tasks.identity import DEFAULT_CREATOR, DEFAULT_NAME

PIPELINE_STAGES = ("tok", "pretrain", "mid", "sft", "eval", "report", "chat")
DEMO_PROMPT = "Who are you?"


@dataclass
class RunOptions:
    stages: list[str] = field(default_factory=lambda: list(PIPELINE_STAGES))
    vocab_size: int | None = None  # None: 32768 on CUDA (nanochat), 4096 on CPU (tiny model, tiny corpus)
    depth: int | None = None  # None: the pretrain device default
    device: str = "auto"
    force: bool = False
    prompt: str = DEMO_PROMPT
    identity_name: str = DEFAULT_NAME  # mid and sft teach the model this name ...
    identity_creator: str = DEFAULT_CREATOR  # ... and this creator (tasks/identity.py)


@dataclass
class StageOutcome:
    stage: str
    seconds: float
    summary: str


@dataclass
class RunResult:
    outcomes: list[StageOutcome]
    seconds: float
    reply: str | None = None
    report_path: str | None = None


def _validate(opts: RunOptions) -> None:
    unknown = [s for s in opts.stages if s not in PIPELINE_STAGES]
    if unknown:
        raise UsageError(
            f"--stages: unknown stage(s) {', '.join(unknown)}", f"choose from {', '.join(PIPELINE_STAGES)}"
        )


def run_pipeline(
    opts: RunOptions,
    say: Callable[[str], None] = print,
    *,
    home: Home | str | os.PathLike[str] | None = None,
) -> RunResult:
    """Run the selected stages in pipeline order. Each stage's own skip/resume rules apply.

    An entry point: `home` is resolved here, once, and passed to every stage.
    """
    _validate(opts)
    from nanoctl.device import resolve_device

    device_type = resolve_device(opts.device).type
    t_start = time.perf_counter()
    outcomes: list[StageOutcome] = []
    result = RunResult(outcomes=outcomes, seconds=0.0)
    home = Home.resolve(home)
    identity = {"identity_name": opts.identity_name, "identity_creator": opts.identity_creator}

    def stage(name: str, fn: Callable[[], str]) -> None:
        if name not in opts.stages:
            return
        say(f"── {name} " + "─" * max(0, 60 - len(name)))
        t0 = time.perf_counter()
        summary = fn()
        outcomes.append(StageOutcome(name, time.perf_counter() - t0, summary))
        say(f"✓ {name}: {summary} ({time.perf_counter() - t0:.0f}s)")

    def tok() -> str:
        from nanoctl.tok_train import TokTrainOptions, train_tokenizer

        vocab = opts.vocab_size or (32768 if device_type == "cuda" else 4096)
        r = train_tokenizer(TokTrainOptions(vocab_size=vocab, force=opts.force), home=home)
        if r.skipped:
            return f"kept the existing tokenizer in {r.directory} (vocab {r.vocab_size})"
        return f"vocab {r.vocab_size} trained on {r.characters:,} chars from the {r.source}"

    def pretrain() -> str:
        from nanoctl.train.pretrain import PretrainOptions
        from nanoctl.train.pretrain import pretrain as run

        r = run(PretrainOptions(depth=opts.depth, device=opts.device, force=opts.force), home)
        return _describe(r)

    def mid() -> str:
        from nanoctl.train.mid import MidOptions
        from nanoctl.train.mid import mid as run

        return _describe(run(MidOptions(device=opts.device, force=opts.force, **identity), home))

    def sft() -> str:
        from nanoctl.train.sft import SFTOptions
        from nanoctl.train.sft import sft as run

        return _describe(run(SFTOptions(device=opts.device, force=opts.force, **identity), home))

    def evaluate() -> str:
        from nanoctl.errors import NanoctlError
        from nanoctl.evaluate.base import BaseEvalOptions, eval_base
        from nanoctl.evaluate.core import resolve_bundle

        # CORE needs the eval bundle; without one in the home, measure bpb and samples only.
        try:
            resolve_bundle(home=home, download=False)
            evals: tuple[str, ...] = ("core", "bpb", "sample")
        except NanoctlError:
            evals = ("bpb", "sample")
        # the CORE cap, bpb budget and batch come from eval base's device presets (CPU: minutes)
        r = eval_base(
            BaseEvalOptions(
                evals=list(evals),
                device=opts.device,
                unconditioned_samples=2 if device_type != "cuda" else 8,
                progress=False,
            ),
            home=home,
        )
        parts = [f"{split} bpb {v:.4f}" for split, v in r.bpb.items()]
        if r.core and r.core.get("core") is not None:
            parts.append(f"CORE {r.core['core']:.4f}")
        if "core" not in evals:
            parts.append("CORE skipped: no eval bundle (`nanoctl eval base` downloads it when online)")
        return ", ".join(parts) or "done"

    def report() -> str:
        from nanoctl.report import ReportOptions, generate_report

        r = generate_report(ReportOptions(), home=home)
        result.report_path = r.markdown_path
        return f"report card at {r.markdown_path}"

    def chat() -> str:
        from nanoctl.chat import ChatOptions, load_chat_model, run_once

        loaded = load_chat_model(ChatOptions(device=opts.device), home=home)
        r = run_once(loaded, opts.prompt)
        result.reply = r.reply
        return f"{loaded.ref.label}: {opts.prompt!r} → {r.reply.strip()[:200]!r}"

    for name, fn in (
        ("tok", tok),
        ("pretrain", pretrain),
        ("mid", mid),
        ("sft", sft),
        ("eval", evaluate),
        ("report", report),
        ("chat", chat),
    ):
        stage(name, fn)
    result.seconds = time.perf_counter() - t_start
    return result


def _describe(r: Any) -> str:
    """One line for a training stage's result object (pretrain and post-training share these fields)."""
    if getattr(r, "skipped", False):
        return f"kept the existing checkpoint {getattr(r, 'checkpoint_dir', '')} (use --force to retrain)"
    bits = [f"{r.final_step} steps"]
    if r.final_loss is not None:
        bits.append(f"loss {r.final_loss:.3f}")
    val = getattr(r, "val_bpb", None)
    if val is not None:
        bits.append(f"val bpb {val:.4f}")
    elif getattr(r, "val_loss", None) is not None:
        bits.append(f"val {r.val_loss:.4f}")
    bits.append(f"checkpoint in {r.checkpoint_dir}")
    return ", ".join(bits)
