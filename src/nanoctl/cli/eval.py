"""`nanoctl eval base` (CORE + bpb + samples) and `nanoctl eval chat` (ARC/MMLU/GSM8K/HumanEval/...).

`eval base` is derived from BaseEvalOptions (nanoctl.evaluate.base) like the training commands: every flag,
default, unit and preset value comes from the dataclass.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from nanoctl.cli.common import (
    RUNTIME_PANEL,
    App,
    DeviceOption,
    DtypeOption,
    JsonOption,
    QuantizeOption,
    field_default,
    home_of,
    out,
)
from nanoctl.cli.options import options_command
from nanoctl.evaluate.base import PRESETS as BASE_PRESETS
from nanoctl.evaluate.base import BaseEvalOptions
from nanoctl.evaluate.chat import ChatEvalOptions

_chat = partial(field_default, ChatEvalOptions)  # CLI defaults are the library's

eval_app = App(
    help="Evaluate checkpoints: CORE and bits-per-byte for base models, task accuracy for chat models.",
    invoke_without_command=True,
)


@eval_app.callback()
def eval_callback(
    ctx: typer.Context,
    check_sandbox: Annotated[
        bool,
        typer.Option(
            "--check-sandbox",
            help="Report which code-sandbox layers are active for HumanEval, then exit (1 if code "
            "cannot be contained here).",
        ),
    ] = False,
) -> None:
    if check_sandbox:
        from nanoctl.cli.doctor import print_sandbox, sandbox_rows
        from nanoctl.tools import sandbox

        lay = sandbox.layers()
        print_sandbox(sandbox_rows(), lay.isolated, lay.missing)
        raise typer.Exit(0 if lay.isolated else 1)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(0)

_M = "Model"
_R = RUNTIME_PANEL
Stage = Annotated[str, typer.Option(help="Checkpoint stage: base, mid, sft, rl.", rich_help_panel=_M)]
Tag = Annotated[
    str | None,
    typer.Option(help="Checkpoint tag (default: the largest d<N>).", rich_help_panel=_M, show_default=False),
]
Step = Annotated[
    int | None,
    typer.Option(help="Checkpoint step (default: the latest).", rich_help_panel=_M, show_default=False),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option(help="Evaluate this checkpoint directory instead.", rich_help_panel=_M, show_default=False),
]
NoProgress = Annotated[
    bool, typer.Option("--no-progress", help="No progress bar (results only).", rich_help_panel=_R)
]


def _emit(result: Any, json_output: bool) -> None:
    import json

    if json_output:
        out.print_json(json.dumps(result.to_dict(), default=str))


def _run_base(ctx: typer.Context, opts: BaseEvalOptions, json_output: bool) -> None:
    import os
    import sys
    from dataclasses import replace

    if "torch" not in sys.modules:
        # OpenMP threads that spin while waiting fight other processes for a busy machine's cores. On the
        # project's 2-core box at load 3, a d4 eval took 206 s with spinning and 55 s with passive waits;
        # the eval's ops run for milliseconds, so waking a sleeping thread costs little. Read when torch
        # loads; an explicit OMP_WAIT_POLICY wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from nanoctl.evaluate.base import eval_base

    result = eval_base(replace(opts, progress=opts.progress and not json_output), home=home_of(ctx))
    if json_output:
        _emit(result, True)
        return
    if result.dry_run:
        return  # the plan and the estimate went to stderr
    head = f"{result.stage}/{result.tag} step {result.step}"
    if result.core is not None and result.core.get("core") is not None:
        core = result.core
        out.print(f"CORE {core['core']:.4f} ({len(core['tasks'])}/{core['total_tasks']} tasks) — {head}")
    for split, v in result.bpb.items():
        out.print(f"{split} bpb {v:.4f}")
    for s in result.samples:
        out.print(f"  {s!r}", soft_wrap=True, markup=False)
    if result.markdown_path:
        out.print(f"wrote {result.markdown_path}", soft_wrap=True)


_BASE_DOC = """CORE metric, train/val bits per byte and samples for a base checkpoint (writes reports/<tag>/eval_base_*).

    Without CUDA the budget is sized to finish in minutes (CPU preset); --dry-run prints what will be
    evaluated and a time estimate measured on a few batches of the model.

    Example: [cyan]nanoctl eval base --dry-run[/]  ·  [cyan]nanoctl eval base --max-per-task 100 --split-tokens 1000000[/]
    """
eval_app.command("base")(options_command(BaseEvalOptions, _run_base, BASE_PRESETS, _BASE_DOC))


@eval_app.command("chat")
def eval_chat_cmd(
    ctx: typer.Context,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            "-t",
            help="Task to run (repeatable; default: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee).",
            show_default=False,
        ),
    ] = _chat("tasks"),
    max_problems: Annotated[
        int | None,
        typer.Option("--max-problems", "-x", help="Problems per task (default: all).", show_default=False),
    ] = _chat("max_problems"),
    num_samples: Annotated[
        int, typer.Option("--num-samples", "-n", help="Samples per generative problem (pass@n).")
    ] = _chat("num_samples"),
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature for generative tasks (0 = greedy).")
    ] = _chat("temperature"),
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Top-k for generative tasks (0 = off).")
    ] = _chat("top_k"),
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-m", help="Token budget per answer.")
    ] = _chat("max_new_tokens"),
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Prompts per forward for categorical tasks.")
    ] = _chat("batch_size"),
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Directory holding task datasets (gsm8k/, mmlu/, ...).", show_default=False),
    ] = _chat("data_dir"),
    stage: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint stage (default: the newest of rl > sft > mid).",
            rich_help_panel=_M,
            show_default=False,
        ),
    ] = _chat("stage"),
    tag: Tag = _chat("tag"),
    step: Step = _chat("step"),
    checkpoint: Checkpoint = _chat("checkpoint"),
    lora: Annotated[
        str | None,
        typer.Option("--lora", help="Mount this LoRA adapter directory (base: the adapter's own unless"
                     " --stage/--tag/--step/--checkpoint); writes eval_chat_<stage>-lora_*.",
                     rich_help_panel=_M, show_default=False),
    ] = _chat("lora"),
    device: DeviceOption = _chat("device"),
    dtype: DtypeOption = _chat("dtype"),
    quantize: QuantizeOption = _chat("quantize"),
    unsafe_exec: Annotated[
        bool,
        typer.Option(
            "--unsafe-exec",
            help="Where the kernel sandbox is unavailable, run HumanEval's model-written code with the "
            "Python guard alone (not a security boundary; prints a warning).",
        ),
    ] = _chat("unsafe_exec"),
    no_progress: NoProgress = not _chat("progress"),
    json_output: JsonOption = False,
) -> None:
    """Task accuracy and ChatCORE for a chat checkpoint (writes reports/<tag>/eval_chat_*).

    Example: [cyan]nanoctl eval chat -t GSM8K -t MMLU --max-problems 100[/]
    """
    from nanoctl.evaluate.chat import run_chat_eval

    result = run_chat_eval(
        ChatEvalOptions(
            tasks=task or None,
            stage=stage,
            tag=tag,
            step=step,
            checkpoint=str(checkpoint) if checkpoint else None,
            lora=lora,
            max_problems=max_problems,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            batch_size=batch_size,
            data_dir=str(data_dir) if data_dir else None,
            device=device,
            dtype=dtype,
            quantize=quantize,
            progress=not no_progress and not json_output,
            unsafe_exec=unsafe_exec,
        ),
        home=home_of(ctx),
    )
    if json_output:
        _emit(result, True)
        return
    for t in result.tasks:
        out.print(f"{t.name}: {t.accuracy:.4f} ({t.correct}/{t.problems})")
    if result.chatcore is not None:
        note = "" if result.complete else f" (over {len(result.tasks)} task(s))"
        out.print(f"ChatCORE: {result.chatcore:.4f}{note}")
    if result.markdown_path:
        out.print(f"wrote {result.markdown_path}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(
        eval_app,
        name="eval",
        help="Evaluate checkpoints (CORE, bpb, chat tasks).",
        rich_help_panel="Evaluate",
    )
