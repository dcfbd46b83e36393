"""`nanoctl eval base` (CORE + bpb + samples) and `nanoctl eval chat` (ARC/MMLU/GSM8K/HumanEval/...)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nanoctl.cli.common import RUNTIME_PANEL, App, DeviceOption, DtypeOption, JsonOption, out

eval_app = App(
    help="Evaluate checkpoints: CORE and bits-per-byte for base models, task accuracy for chat models."
)

_M = "Model"
_R = RUNTIME_PANEL
Stage = Annotated[
    str | None,
    typer.Option(help="Checkpoint stage: base, mid, sft, rl.", rich_help_panel=_M, show_default=False),
]
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


@eval_app.command("base")
def eval_base_cmd(
    evals: Annotated[
        str, typer.Option("--eval", help="Comma-separated: core, bpb, sample.")
    ] = "core,bpb,sample",
    max_per_task: Annotated[int, typer.Option(help="CORE examples per task (-1 = all).")] = -1,
    core_task: Annotated[
        list[str] | None,
        typer.Option("--core-task", help="Only this CORE task label (repeatable).", show_default=False),
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="CORE eval bundle directory (default: <home>/eval/bundle, downloaded once).",
            show_default=False,
        ),
    ] = None,
    no_download: Annotated[
        bool, typer.Option("--no-download", help="Fail instead of downloading the CORE bundle.")
    ] = False,
    device_batch_size: Annotated[
        int, typer.Option(help="Rows per forward (bpb batch rows; CORE rows per batch).")
    ] = 32,
    split_tokens: Annotated[
        int, typer.Option(help="Tokens per split for bpb (rounded down to whole batches).")
    ] = 40 * 524288,
    stage: Stage = "base",
    tag: Tag = None,
    step: Step = None,
    checkpoint: Checkpoint = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    no_progress: NoProgress = False,
    json_output: JsonOption = False,
) -> None:
    """CORE metric, train/val bits per byte and samples for a base checkpoint (writes reports/<tag>/eval_base_*).

    Example: [cyan]nanoctl eval base --max-per-task 100 --split-tokens 1000000[/]
    """
    from nanoctl.evaluate.base import BaseEvalOptions, eval_base

    result = eval_base(
        BaseEvalOptions(
            stage=stage or "base",
            tag=tag,
            step=step,
            checkpoint=str(checkpoint) if checkpoint else None,
            evals=[e.strip() for e in evals.split(",") if e.strip()],
            max_per_task=max_per_task,
            core_tasks=core_task or None,
            bundle=str(bundle) if bundle else None,
            download=not no_download,
            device_batch_size=device_batch_size,
            split_tokens=split_tokens,
            device=device,
            dtype=dtype,
            progress=not no_progress and not json_output,
        )
    )
    if json_output:
        _emit(result, True)
        return
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


@eval_app.command("chat")
def eval_chat_cmd(
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            "-t",
            help="Task to run (repeatable; default: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee).",
            show_default=False,
        ),
    ] = None,
    max_problems: Annotated[
        int | None,
        typer.Option("--max-problems", "-x", help="Problems per task (default: all).", show_default=False),
    ] = None,
    num_samples: Annotated[
        int, typer.Option("--num-samples", "-n", help="Samples per generative problem (pass@n).")
    ] = 1,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature for generative tasks (0 = greedy).")
    ] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Top-k for generative tasks (0 = off).")] = 50,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-m", help="Token budget per answer.")
    ] = 512,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Prompts per forward for categorical tasks.")
    ] = 8,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Directory holding task datasets (gsm8k/, mmlu/, ...).", show_default=False),
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint stage (default: the newest of rl > sft > mid).",
            rich_help_panel=_M,
            show_default=False,
        ),
    ] = None,
    tag: Tag = None,
    step: Step = None,
    checkpoint: Checkpoint = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    no_progress: NoProgress = False,
    json_output: JsonOption = False,
) -> None:
    """Task accuracy and ChatCORE for a chat checkpoint (writes reports/<tag>/eval_chat_*).

    Example: [cyan]nanoctl eval chat -t GSM8K -t MMLU --max-problems 100[/]
    """
    from nanoctl.evaluate.chat import ChatEvalOptions, run_chat_eval

    result = run_chat_eval(
        ChatEvalOptions(
            tasks=task or None,
            stage=stage,
            tag=tag,
            step=step,
            checkpoint=str(checkpoint) if checkpoint else None,
            max_problems=max_problems,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            batch_size=batch_size,
            data_dir=str(data_dir) if data_dir else None,
            device=device,
            dtype=dtype,
            progress=not no_progress and not json_output,
        )
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
